"""Reading labelled files: CSV/TSV (with a header), JSON Lines and CoNLL column files, .gz transparently.

Each record's text and label are checked by the task (tasks/task.py), so a refusal names the file, the line and the
column. No tokenizing here (tasks/encode.py) and no tensors.
"""

from __future__ import annotations

import csv
import gzip
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

from maskedlm.errors import UserError


@dataclass
class Examples:
    """One labelled file. texts: strings, or lists of words (tokens); labels: names (classify), floats (regress),
    lists of tag names (tokens), or None when a --test file has no label column."""

    path: str
    texts: list
    pairs: list | None
    labels: list | None


def _file_kind(path: Path, fallback: str | None) -> str:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".tsv"):
        return "tsv"
    if name.endswith(".csv"):
        return "csv"
    if fallback:
        return fallback  # CoNLL-2003 and UD files carry no telling suffix (train.txt, *.conll, *.conllu)
    raise UserError(f"{path}: cannot tell the format from the name; use .csv, .tsv, .jsonl (optionally .gz)")


def _read_text(path: Path) -> str:
    """The whole file as text (labelled sets fit in memory); .gz decompressed, invalid UTF-8 replaced, a BOM dropped."""
    if not path.is_file():
        raise UserError(f"labelled file {str(path)!r} does not exist")
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    return raw.decode("utf-8", errors="replace").removeprefix("\ufeff")


def _jsonl_records(path: Path, text: str) -> list[tuple[int, dict]]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path}: line {n} is not valid JSON ({e})") from None
        if not isinstance(rec, dict):
            raise UserError(f"{path}: line {n} is not a JSON object")
        out.append((n, rec))
    return out


def _conll_records(text: str) -> list[tuple[int, dict]]:
    """One record {"tokens": words, "tags": last column} per blank-line-separated sentence; -DOCSTART- lines skipped."""
    out, words, tags, start = [], [], [], 1
    for n, line in enumerate(text.splitlines() + [""], 1):
        cols = line.split()
        if cols and cols[0] == "-DOCSTART-":
            continue
        if cols:
            if not words:
                start = n
            words.append(cols[0])
            tags.append(cols[-1])
        elif words:
            out.append((start, {"tokens": words, "tags": tags}))
            words, tags = [], []
    return out


def read_records(path: Path, fallback_kind: str | None = None) -> list[tuple[int, dict]]:
    """(line number, record) for every example in the file; CSV/TSV records map header names to strings.
    fallback_kind: the format of a file whose name tells none ("conll" for word-level tasks; else refused)."""
    text = _read_text(path)
    kind = _file_kind(path, fallback_kind)
    if kind == "jsonl":
        return _jsonl_records(path, text)
    if kind == "conll":
        return _conll_records(text)
    # GLUE's TSVs hold unbalanced quotes in their texts: a tab is the only separator there (as its loaders read)
    opts = dict(delimiter="\t", quoting=csv.QUOTE_NONE) if kind == "tsv" else {}
    reader = csv.DictReader(text.splitlines(), **opts)
    return [(reader.line_num, rec) for rec in reader]


def _field(path, n, rec, name, columns):
    v = rec.get(name)
    if v is None or (isinstance(v, str) and v == "" and name not in columns):
        raise UserError(f"{path}: line {n} has no column {name!r} (columns: {', '.join(map(str, columns))})")
    return v


def read_examples(path, task, text_field: str, pair_field: str | None, label_field: str,
                  labels_required: bool = True) -> Examples:
    """The examples of one labelled file for `task` (a tasks.Task, which checks each text and label);
    UserError for an empty file, a missing column or a bad label."""
    path = Path(path)
    recs = read_records(path, task.fallback_kind)
    if not recs:
        raise UserError(f"{path} holds no examples")
    columns = list(recs[0][1].keys())
    has_labels = labels_required or label_field in columns
    texts, pairs, labels = [], [] if pair_field else None, [] if has_labels else None
    for n, rec in recs:
        at = f"{path}: line {n}"
        texts.append(task.text(_field(path, n, rec, text_field, columns), at, text_field))
        if pair_field:
            pairs.append(str(_field(path, n, rec, pair_field, columns)))
        if labels is not None:
            labels.append(task.label(_field(path, n, rec, label_field, columns), texts[-1], at, label_field))
    return Examples(str(path), texts, pairs, labels)
