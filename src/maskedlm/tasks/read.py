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
    if not path.exists():
        raise UserError(f"labelled file {str(path)!r} does not exist")
    if not path.is_file():  # a directory, or a FIFO whose reading would block until a writer comes
        raise UserError(f"labelled file {str(path)!r} is not a regular file (a directory, FIFO or device); pass a file")
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
        except (ValueError, RecursionError) as e:
            raise UserError(f"{path}: line {n} is not valid JSON ({str(e)[:80]})") from None
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
    return _table_records(path, text, kind)


def _table_records(path: Path, text: str, kind: str) -> list[tuple[int, dict]]:
    # GLUE's TSVs hold unbalanced quotes in their texts: a tab is the only separator there (as its loaders read)
    opts = dict(delimiter="\t", quoting=csv.QUOTE_NONE) if kind == "tsv" else {}
    reader = csv.DictReader(text.splitlines(), **opts)
    limit = csv.field_size_limit(2**31 - 1)  # a long document is a text like any other (its default: 128 KiB)
    try:
        names = reader.fieldnames or []
        twice = sorted({c for c in names if names.count(c) > 1})
        if twice:  # DictReader would keep the last column of a name, silently
            raise UserError(f"{path}: the header names the column {twice[0]!r} more than once; rename one")
        return [(reader.line_num, rec) for rec in reader]
    except csv.Error as e:
        raise UserError(f"{path}: line {reader.line_num} is not valid {kind.upper()} ({e})") from None
    finally:
        csv.field_size_limit(limit)


def _field(path, n, rec, name, columns):
    if name not in rec or (rec[name] is None and name not in columns):
        raise UserError(f"{path}: line {n} has no column {name!r} (columns: {', '.join(map(str, columns))})")
    if rec[name] is None:
        raise UserError(f"{path}: line {n}: the column {name!r} is empty (null, or missing from the row)")
    return rec[name]


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
            v = _field(path, n, rec, pair_field, columns)
            if not isinstance(v, (str, int, float)) or isinstance(v, bool):
                raise UserError(f"{at}: the column {pair_field!r} holds {json.dumps(v)[:40]}, not a text")
            pairs.append(str(v))
        if labels is not None:
            labels.append(task.label(_field(path, n, rec, label_field, columns), texts[-1], at, label_field))
    return Examples(str(path), texts, pairs, labels)
