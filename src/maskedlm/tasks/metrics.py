"""Metrics of labelled predictions, computed by hand: accuracy, macro-F1 and MCC; Pearson and Spearman; word accuracy
and entity-level F1 read as conlleval reads BIO/BIOES tags; a summary over seeds.

Pure Python on lists of class ids, numbers or tag names: no tensors, no files. Which metric picks the best checkpoint
is the task's (tasks/task.py).
"""

from __future__ import annotations

import math
import statistics


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


def summarize(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value) and median over seeds."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "median": statistics.median(values)}
