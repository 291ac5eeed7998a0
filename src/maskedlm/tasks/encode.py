"""Encoding labelled examples as token rows: [CLS] a [SEP] (b [SEP]) with BERT's segment ids, or words → sub-tokens.

Rows are kept unpadded (one list per example); `collate` pads a batch to its own longest row. No labels here beyond
the positions that word-level labels attach to (Encoded.first); targets are the task's (tasks/task.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100  # label of positions that carry no loss: padding, special tokens, a word's later sub-tokens


@dataclass
class Encoded:
    """Token rows of one file, unpadded. first: for word-level tasks, each word's first sub-token position (-1: cut
    off), else None."""

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


def encode_words(tok, sentences: list[list[str]], max_len: int, special) -> Encoded:
    """[CLS] sub-tokens [SEP] per sentence of words, and each word's first sub-token position (after [CLS])."""
    cls, sep = special.cls, special.sep
    ids, types, first, cut = [], [], [], 0
    for words, enc in zip(sentences, tok.encode_batch(sentences, is_pretokenized=True, add_special_tokens=False)):
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


def encode_texts(tok, texts: list[str], pairs: list[str] | None, max_len: int, special) -> Encoded:
    """[CLS] a [SEP] (b [SEP]) with BERT's segment ids (0, then 1 for b); pairs cut longest-first to max_len."""
    cls, sep = special.cls, special.sep
    ids, types, cut = [], [], 0
    a_all = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    b_all = [e.ids for e in tok.encode_batch(pairs, add_special_tokens=False)] if pairs is not None else None
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


def gather_words(x: torch.Tensor, index, enc: Encoded) -> torch.Tensor:
    """(B, T, K) per-position vectors → (W, K) at each word's first sub-token, in order; zeros for words cut off."""
    out = []
    for j, i in enumerate(index):
        pos = torch.tensor(enc.first[i], dtype=torch.long, device=x.device)  # (W_j,)
        out.append(x[j, pos.clamp(min=0)] * (pos >= 0)[:, None])  # (W_j, K)
    return torch.cat(out)  # (W, K)
