"""Labelled data, task heads and metrics shared by fine-tuning (finetune.py) and linear probing (probe.py).

Reads CSV/TSV (with a header), JSON Lines and CoNLL column files (.gz transparently), encodes examples as
[CLS] a [SEP] (b [SEP]) rows, and holds the heads with exactly the tensors of transformers'
{Bert,ModernBert}For{Sequence,Token}Classification plus their key map. No training and no linear probe here.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import statistics
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskedlm.errors import UserError
from maskedlm.hf import hf_config, to_hf_state_dict
from maskedlm.model import Encoder, MaskedLM, padded_vocab_size

TASKS = ("classify", "regress", "tokens")
IGNORE = -100  # label of positions that carry no loss: padding, special tokens, a word's later sub-tokens


REGRESS_LIMIT = 1e18  # |target| whose square (and a batch's sum of them) stays finite in float32 (max ~3.4e38)


# ------------------------------------------------------------------------------------------------ reading files
def _file_kind(path: Path, task: str) -> str:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".tsv"):
        return "tsv"
    if name.endswith(".csv"):
        return "csv"
    if task == "tokens":
        return "conll"  # CoNLL-2003 and UD files carry no telling suffix (train.txt, *.conll, *.conllu)
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


def _records(path: Path, task: str) -> list[tuple[int, dict]]:
    """(line number, record) for every example in the file; CSV/TSV records map header names to strings."""
    text = _read_text(path)
    kind = _file_kind(path, task)
    out = []
    if kind == "jsonl":
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
    elif kind == "conll":
        words, tags, start = [], [], 1
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
    else:
        # GLUE's TSVs hold unbalanced quotes in their texts: a tab is the only separator there (as its loaders read)
        opts = dict(delimiter="\t", quoting=csv.QUOTE_NONE) if kind == "tsv" else {}
        reader = csv.DictReader(text.splitlines(), **opts)
        limit = csv.field_size_limit(2**31 - 1)  # a long document is a text like any other (its default: 128 KiB)
        try:
            names = reader.fieldnames or []
            twice = sorted({c for c in names if names.count(c) > 1})
            if twice:  # DictReader would keep the last column of a name, silently
                raise UserError(f"{path}: the header names the column {twice[0]!r} more than once; rename one")
            for rec in reader:
                out.append((reader.line_num, rec))
        except csv.Error as e:
            raise UserError(f"{path}: line {reader.line_num} is not valid {kind.upper()} ({e})") from None
        finally:
            csv.field_size_limit(limit)
    return out


@dataclass
class Examples:
    """One labelled file. texts: strings, or lists of words (tokens); labels: names (classify), floats (regress),
    lists of tag names (tokens), or None when a --test file has no label column."""

    path: str
    texts: list
    pairs: list | None
    labels: list | None


def _label_name(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and v.is_integer():
        return str(int(v))  # 1.0 in one file and 1 in another are the same class
    return str(v).strip()


def _field(path, n, rec, name, columns, kinds=(str, int, float)):
    """The value of column `name`, of one of `kinds` (JSON Lines: an object or a list is no text or label)."""
    if name not in rec or (rec[name] is None and name not in columns):
        raise UserError(f"{path}: line {n} has no column {name!r} (columns: {', '.join(map(str, columns))})")
    v = rec[name]
    if v is None:
        raise UserError(f"{path}: line {n}: the column {name!r} is empty (null, or missing from the row)")
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
        raise UserError(f"{path}: line {n}: the column {name!r} holds {json.dumps(v)[:40]}, not a "
                        + ("list of words" if kinds == (list,) else "text, number or label"))
    return v


# Long: one pass that checks each field of each record, so every refusal names the file, the line and the column.
def read_examples(path, task: str, text_field: str, pair_field: str | None, label_field: str,
                  labels_required: bool = True) -> Examples:
    """The examples of one labelled file; UserError for an empty file, a missing column or a bad label."""
    path = Path(path)
    recs = _records(path, task)
    if not recs:
        raise UserError(f"{path} holds no examples")
    columns = list(recs[0][1].keys())
    has_labels = labels_required or label_field in columns
    texts, pairs, labels = [], [] if pair_field else None, [] if has_labels else None
    for n, rec in recs:
        text = _field(path, n, rec, text_field, columns, (list,) if task == "tokens" else (str, int, float))
        if task == "tokens":
            if not text or not all(isinstance(w, str) and w.strip() for w in text):
                raise UserError(f"{path}: line {n}: {text_field!r} must be a non-empty list of words, got "
                                f"{str(text)[:60]!r}")
        elif not isinstance(text, str):
            text = str(text)
        texts.append(text)
        if pair_field:
            pairs.append(str(_field(path, n, rec, pair_field, columns)))
        if labels is None:
            continue
        v = _field(path, n, rec, label_field, columns, (list,) if task == "tokens" else (str, int, float, bool))
        if task == "classify":
            if _label_name(v) == "":
                raise UserError(f"{path}: line {n} has an empty label in column {label_field!r}")
            labels.append(_label_name(v))
        elif task == "regress":
            try:
                labels.append(float(v))
            except (TypeError, ValueError):
                raise UserError(f"{path}: line {n}: the label {v!r} in column {label_field!r} is not a number") from None
            if not math.isfinite(labels[-1]):
                raise UserError(f"{path}: line {n}: the label {v!r} is not a finite number")
            if abs(labels[-1]) > REGRESS_LIMIT:  # the loss squares it in float32: 1e300 became inf, then NaN
                raise UserError(f"{path}: line {n}: the label {v!r} is beyond ±1e18, which the float32 loss cannot "
                                "square; rescale the targets")
        else:
            if len(v) != len(text) or not all(isinstance(t, (str, int)) and _label_name(t) for t in v):
                raise UserError(f"{path}: line {n}: {label_field!r} must be a list of one tag per word "
                                f"({len(text)} words), got {str(v)[:60]!r}")
            labels.append([_label_name(t) for t in v])
    return Examples(str(path), texts, pairs, labels)


def label_names(train: Examples, task: str) -> list[str]:
    """The label set, from the train file: sorted (numerically when every name is an integer)."""
    if task == "regress":
        if len(set(train.labels)) < 2:
            raise UserError(f"{train.path}: every label is {train.labels[0]!r}; regression needs labels that vary")
        return ["score"]
    names = {t for tags in train.labels for t in tags} if task == "tokens" else set(train.labels)
    if len(names) < 2:
        raise UserError(f"{train.path} has one class only ({next(iter(names))!r}); a classifier needs at least two")

    def key(s):
        try:
            return (0, int(s), "")
        except ValueError:
            return (1, 0, s)

    return sorted(names, key=key)


def check_labels(ex: Examples, names: list[str], task: str, train_path: str) -> None:
    if ex.labels is None or task == "regress":
        return
    seen = {t for tags in ex.labels for t in tags} if task == "tokens" else set(ex.labels)
    unseen = sorted(seen - set(names))
    if unseen:
        raise UserError(f"{ex.path} has labels that {train_path} never has: {', '.join(map(repr, unseen[:5]))}; "
                        "the label set comes from the train file")


# ------------------------------------------------------------------------------------------------ encoding
@dataclass
class Encoded:
    """Token rows of one file. first: for the tokens task, each word's first sub-token position (-1: cut off)."""

    ids: list[list[int]]
    types: list[list[int]]
    first: list[list[int]] | None
    truncated: int  # examples that lost tokens to max_len


def _cut_pair(la: int, lb: int, budget: int) -> tuple[int, int]:
    """Lengths after longest-first truncation (transformers' default for pairs): the longer text loses tokens first."""
    if la + lb <= budget:
        return la, lb
    short = min(la, lb)
    if short <= budget // 2:
        return (budget - lb, lb) if la > lb else (la, budget - la)
    return budget - budget // 2, budget // 2


def encode(tok, ex: Examples, task: str, max_len: int, special) -> Encoded:
    """[CLS] a [SEP] (b [SEP]) with BERT's segment ids (0, then 1 for b); words → sub-tokens for the tokens task."""
    cls, sep = special.cls, special.sep
    ids, types, first, cut = [], [], [] if task == "tokens" else None, 0
    if task == "tokens":
        for words, enc in zip(ex.texts, tok.encode_batch(ex.texts, is_pretokenized=True, add_special_tokens=False)):
            keep = enc.ids[: max_len - 2]
            pos: dict[int, int] = {}
            for p, w in enumerate(enc.word_ids[: len(keep)]):
                if w is not None and w not in pos:
                    pos[w] = p + 1  # after [CLS]
            cut += len(keep) < len(enc.ids)
            ids.append([cls, *keep, sep])
            types.append([0] * (len(keep) + 2))
            first.append([pos.get(w, -1) for w in range(len(words))])  # a word with no token: -1 too
        return Encoded(ids, types, first, cut)
    a_all = [e.ids for e in tok.encode_batch(ex.texts, add_special_tokens=False)]
    b_all = [e.ids for e in tok.encode_batch(ex.pairs, add_special_tokens=False)] if ex.pairs is not None else None
    for i, a in enumerate(a_all):
        if b_all is None:
            keep = a[: max_len - 2]
            cut += len(keep) < len(a)
            ids.append([cls, *keep, sep])
            types.append([0] * (len(keep) + 2))
        else:
            b = b_all[i]
            la, lb = _cut_pair(len(a), len(b), max_len - 3)
            cut += (la, lb) != (len(a), len(b))
            ids.append([cls, *a[:la], sep, *b[:lb], sep])
            types.append([0] * (la + 2) + [1] * (lb + 1))
    return Encoded(ids, types, None, cut)


def collate(enc: Encoded, index, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, token_type_ids), each (B, T), padded to the batch's longest row."""
    rows = [enc.ids[i] for i in index]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
    types = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
    for j, i in enumerate(index):
        n = len(enc.ids[i])
        ids[j, :n] = torch.tensor(enc.ids[i])
        mask[j, :n] = 1
        types[j, :n] = torch.tensor(enc.types[i])
    return ids, mask, types


def label_tensor(task: str, labels: list, index, names: list[str], enc: Encoded, T: int) -> torch.Tensor:
    """classify: (B,) class ids; regress: (B,) floats; tokens: (B, T) tag ids at words' first sub-tokens, else -100."""
    if task == "regress":
        return torch.tensor([labels[i] for i in index], dtype=torch.float32)  # (B,)
    lookup = {n: k for k, n in enumerate(names)}
    if task == "classify":
        return torch.tensor([lookup[labels[i]] for i in index], dtype=torch.long)  # (B,)
    out = torch.full((len(index), T), IGNORE, dtype=torch.long)  # (B, T)
    for j, i in enumerate(index):
        for p, tag in zip(enc.first[i], labels[i]):
            if p >= 0:
                out[j, p] = lookup[tag]
    return out


# ------------------------------------------------------------------------------------------------ the heads
class _Transform(nn.Module):
    """ModernBertPredictionHead: dense (no bias) → GELU → LayerNorm (no bias), the same shape as the MLM head's."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden, bias=False)
        self.norm = nn.LayerNorm(hidden, eps=eps, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(h)))  # (..., C)


class TaskModel(nn.Module):
    """θ and a task head with exactly the tensors of transformers' classes: BertForSequenceClassification (pooler:
    dense + tanh at [CLS], dropout, classifier), BertForTokenClassification (dropout, classifier at every token),
    ModernBertFor{Sequence,Token}Classification ([CLS] or every token → dense, GELU, LayerNorm → dropout → classifier).
    """

    def __init__(self, mcfg, task: str, num_labels: int, dropout: float):
        super().__init__()
        if task not in TASKS:
            raise UserError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        mcfg = replace(mcfg, dropout=dropout, attention_dropout=dropout)
        self.cfg, self.task, self.num_labels, self.dropout = mcfg, task, num_labels, dropout
        self.sequence = task != "tokens"
        self.encoder = Encoder(mcfg, padded_vocab_size(mcfg.vocab_size, mcfg.pad_vocab_multiple))
        C = mcfg.hidden
        if mcfg.family == "bert":
            self.pooler = nn.Linear(C, C) if self.sequence else None
        else:
            self.head = _Transform(C, mcfg.layer_norm_eps)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(C, num_labels)

    @classmethod
    def from_mlm(cls, mlm: MaskedLM, task: str, num_labels: int, dropout: float, seed: int) -> "TaskModel":
        """θ from a pretrained MaskedLM; new tensors N(0, initializer_range) from a private generator keyed by
        `seed`, biases 0. ModernBERT's transform takes the MLM head's (same names, as transformers loads them)."""
        m = cls(mlm.cfg, task, num_labels, dropout)
        m.encoder.load_state_dict(mlm.encoder.state_dict())
        g = torch.Generator().manual_seed(int(seed))
        std = mlm.cfg.initializer_range
        with torch.no_grad():
            for lin in (m.classifier, getattr(m, "pooler", None)):
                if lin is not None:
                    lin.weight.normal_(0.0, std, generator=g)
                    lin.bias.zero_()
            if mlm.cfg.family == "modern":
                m.head.dense.weight.copy_(mlm.head.dense.weight)
                m.head.norm.weight.copy_(mlm.head.norm.weight)
        return m.to(next(mlm.parameters()).device)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """(B, T) ids → logits (B, L) for sequence tasks, (B, T, L) for the tokens task."""
        types = token_type_ids if self.cfg.family == "bert" else None
        h = self.encoder(input_ids, attention_mask=attention_mask, token_type_ids=types)  # (B, T, C)
        if self.sequence:
            h = h[:, 0]  # (B, C) [CLS]: BERT's pooler input and ModernBERT's classifier_pooling="cls" (its default)
            h = torch.tanh(self.pooler(h)) if self.cfg.family == "bert" else self.head(h)  # (B, C)
        elif self.cfg.family == "modern":
            h = self.head(h)  # (B, T, C)
        return self.classifier(self.drop(h))  # (B, L) or (B, T, L)


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ loss over the labelled items, their count): cross-entropy for classify and tokens (at labelled positions
    only), squared error for regress; in fp32. Σ / count is transformers' loss for the same batch."""
    if task == "regress":
        err = (logits.float().squeeze(-1) - labels.float()) ** 2  # (B,)
        return err.sum(), torch.tensor(err.numel(), device=err.device)
    flat = logits.float().reshape(-1, logits.shape[-1])  # (N, L)
    target = labels.reshape(-1)  # (N,)
    return F.cross_entropy(flat, target, ignore_index=IGNORE, reduction="sum"), (target != IGNORE).sum()


def hf_task_config(model: TaskModel, names: list[str], special: dict) -> dict:
    """config.json for transformers' class of this task and family (labels in id2label / label2id)."""
    cfg = hf_config(model.cfg, special=special)
    kind = "SequenceClassification" if model.sequence else "TokenClassification"
    cfg["architectures"] = [("Bert" if model.cfg.family == "bert" else "ModernBert") + "For" + kind]
    shown = names if model.task != "regress" else ["LABEL_0"]
    cfg["id2label"] = {str(i): n for i, n in enumerate(shown)}
    cfg["label2id"] = {n: i for i, n in enumerate(shown)}
    cfg["classifier_dropout"] = model.dropout
    if model.sequence:
        cfg["problem_type"] = "regression" if model.task == "regress" else "single_label_classification"
    if model.cfg.family == "modern":
        cfg["classifier_pooling"] = "cls"
    return cfg


def to_hf_task_state_dict(model: TaskModel) -> dict[str, torch.Tensor]:
    """Our TaskModel → the state dict of transformers' class: the encoder through hf.py's MLM key map, then the head."""
    mlm = MaskedLM(replace(model.cfg, dropout=0.0, attention_dropout=0.0))
    mlm.encoder.load_state_dict(model.encoder.state_dict())
    if model.cfg.family == "modern":
        mlm.head.dense.load_state_dict(model.head.dense.state_dict())
        mlm.head.norm.load_state_dict(model.head.norm.state_dict())
    keep = ("bert.",) if model.cfg.family == "bert" else ("model.", "head.")
    sd = {k: v for k, v in to_hf_state_dict(mlm).items() if k.startswith(keep)}
    if getattr(model, "pooler", None) is not None:
        sd["bert.pooler.dense.weight"] = model.pooler.weight
        sd["bert.pooler.dense.bias"] = model.pooler.bias
    sd["classifier.weight"], sd["classifier.bias"] = model.classifier.weight, model.classifier.bias
    return {k: v.detach().cpu().clone().contiguous() for k, v in sd.items()}


# ------------------------------------------------------------------------------------------------ metrics
def classify_metrics(gold: list[int], pred: list[int]) -> dict:
    """accuracy; macro-F1 over the classes in gold or predictions (F1 0 where undefined); MCC (Gorodkin's K-class
    form, 0 when a marginal is constant)."""
    n = len(gold)
    classes = sorted(set(gold) | set(pred))
    f1s = []
    for c in classes:
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    correct = sum(g == p for g, p in zip(gold, pred))
    t = {c: gold.count(c) for c in classes}
    p = {c: pred.count(c) for c in classes}
    num = correct * n - sum(t[c] * p[c] for c in classes)
    den = math.sqrt((n * n - sum(v * v for v in p.values())) * (n * n - sum(v * v for v in t.values())))
    return {"accuracy": correct / n, "macro_f1": sum(f1s) / len(f1s), "mcc": num / den if den else 0.0}


def _pearson(x: list[float], y: list[float]) -> float:
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sx = math.sqrt(sum((a - mx) ** 2 for a in x))
    sy = math.sqrt(sum((b - my) ** 2 for b in y))
    return sxy / (sx * sy) if sx > 0 and sy > 0 else 0.0  # a constant prediction ranks nothing: scored 0, not NaN


def _ranks(x: list[float]) -> list[float]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1  # ties share their mean rank
        i = j + 1
    return r


def regress_metrics(gold: list[float], pred: list[float]) -> dict:
    return {"pearson": _pearson(gold, pred), "spearman": _pearson(_ranks(gold), _ranks(pred)),
            "mse": statistics.fmean((g - p) ** 2 for g, p in zip(gold, pred))}


def _split_tag(tag: str) -> tuple[str, str]:
    if tag == "O":
        return "O", ""
    head, dash, kind = tag.partition("-")
    return (head, kind) if dash and head in ("B", "I", "E", "S") else ("I", tag)


def entities(tags: list[str]) -> set[tuple[int, int, str]]:
    """(start, end, type) spans of BIO (and BIOES) tags, read as conlleval does: an I- after O or after another type
    starts an entity."""
    out, start, kind = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        p, k = _split_tag(tag)
        if start is not None and (p in ("B", "S", "O") or k != kind):
            out.add((start, i, kind))
            start = kind = None
        if p in ("B", "S") or (p in ("I", "E") and start is None):
            start, kind = i, k
        if p in ("E", "S"):
            out.add((start, i + 1, kind))
            start = kind = None
    return out


def token_metrics(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """Word-level accuracy; for BIO tags also entity-level precision, recall and F1 (micro, exact spans and types)."""
    words = sum(len(g) for g in gold)
    out = {"token_accuracy": sum(a == b for g, p in zip(gold, pred) for a, b in zip(g, p)) / words}
    if any(_split_tag(t)[0] in ("B", "E", "S") or t.startswith("I-") for g in gold for t in g):
        tp = n_gold = n_pred = 0
        for g, p in zip(gold, pred):
            eg, ep = entities(g), entities(p)
            tp, n_gold, n_pred = tp + len(eg & ep), n_gold + len(eg), n_pred + len(ep)
        prec, rec = (tp / n_pred if n_pred else 0.0), (tp / n_gold if n_gold else 0.0)
        out.update(entity_precision=prec, entity_recall=rec,
                   entity_f1=2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    return out


def main_metric(task: str, metrics: dict) -> str:
    """The metric that picks the best checkpoint: accuracy, Spearman (STS-B's headline), entity F1 for BIO tags
    (CoNLL-2003's), token accuracy for other tags (POS)."""
    if task == "classify":
        return "accuracy"
    if task == "regress":
        return "spearman"
    return "entity_f1" if "entity_f1" in metrics else "token_accuracy"


def score(task: str, names: list[str], gold: list, pred: list) -> dict:
    """The task's metrics from gold labels and predictions as the files spell them (names, numbers, tag lists)."""
    if task == "classify":
        lookup = {n: k for k, n in enumerate(names)}
        return classify_metrics([lookup[g] for g in gold], [lookup[p] for p in pred])
    if task == "regress":
        return regress_metrics(gold, pred)
    return token_metrics(gold, pred)


def fallback_tag(names: list[str]) -> str:
    """The tag given to a word cut off by max_len (it is scored, not dropped): O when the tag set has it."""
    return "O" if "O" in names else names[0]


def summarize(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value) and median over seeds."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "median": statistics.median(values)}


# ------------------------------------------------------------------------------------------------ a task's data
@dataclass
class TaskData:
    """A task read and encoded: its label names and, per split (train, eval, test), the examples and their rows."""

    task: str
    names: list[str]
    examples: dict[str, Examples]
    encoded: dict[str, Encoded]


def check_tokenizer(net, tok, model_path) -> None:
    """A MODEL must bring its own tokenizer, and that tokenizer's ids must all be rows of the model's embeddings."""
    if tok is None:
        raise UserError(f"{model_path} has no tokenizer.json; fine-tuning needs the tokenizer the model was trained with")
    if tok.get_vocab_size() > net.vocab_size:
        raise UserError(f"{model_path}: the tokenizer has {tok.get_vocab_size()} tokens but the model has "
                        f"{net.vocab_size} vocabulary rows; they do not belong together")


def load_task(tok, special, task: str, files: dict, text_field: str | None, pair_field: str | None,
              label_field: str | None, max_len: int, warn=print) -> TaskData:
    """Read and encode the labelled files {"train": path, "eval": path, "test": path or None}; the label set comes
    from train, and eval (and test, when it has labels) may hold no label train lacks."""
    if task not in TASKS:
        raise UserError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    if task == "tokens" and pair_field:
        raise UserError("--text-pair-field does not apply to --task tokens")
    text_field = text_field or ("tokens" if task == "tokens" else "text")
    label_field = label_field or ("tags" if task == "tokens" else "label")
    examples = {name: read_examples(path, task, text_field, pair_field, label_field, labels_required=name != "test")
                for name, path in files.items() if path is not None}
    names = label_names(examples["train"], task)
    for ex in examples.values():
        check_labels(ex, names, task, examples["train"].path)
    encoded = {name: encode(tok, ex, task, max_len, special) for name, ex in examples.items()}
    for name, ex in examples.items():
        if encoded[name].truncated:
            warn(f"note: {encoded[name].truncated} of {len(ex.texts)} examples in {ex.path} are longer than "
                 f"{max_len} tokens and were truncated (finetune.max_len)")
    return TaskData(task, names, examples, encoded)
