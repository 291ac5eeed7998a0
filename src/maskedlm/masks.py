"""`maskedlm masks`: what a masking configuration does to a prepared split, shown before any training.

A few rows as words, x with A(x) marked and x̄ as the encoder sees it, and statistics over the split: selected share,
[MASK]/random/kept shares, unit lengths, special tokens. Every mask comes from masking.mask_batch, the call training
makes, keyed the same way (row index = position in the split), so the report shows exactly what training would see.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from maskedlm.config import load_config
from maskedlm.data.shards import open_data_dir
from maskedlm.errors import UserError
from maskedlm.masking import config_k_max, eligible, mask_batch, rates_at, unit_length_probs, unit_starts
from maskedlm.tokenizer import load_tokenizer

_CHUNK_ROWS = 2048  # rows masked at once: bounded memory on any split size


def _piece(tok, i: int) -> str:
    """A token as text inside a word: WordPiece's ## and the BPE/Unigram word-boundary marks dropped."""
    if tok is None:
        return str(i)
    t = tok.id_to_token(int(i))
    if t is None:
        return f"<{i}>"
    if t.startswith("##"):
        return t[2:]
    return t.lstrip("Ġ▁") or t


def _word_text(tok, ids: list[int]) -> str:
    """A whole word as the tokenizer writes it (bytes of byte-level BPE reassembled), else its pieces joined."""
    if tok is not None:
        text = tok.decode(ids, skip_special_tokens=False).strip()
        if text:
            return text
    return "".join(_piece(tok, i) for i in ids)


def _render_row(tok, x, x_bar, predicted, corrupted, starts) -> tuple[str, str]:
    """x with A(x) marked ⟦…⟧ and x̄ with random replacements marked «…», both as words."""
    words_x, words_xb = [], []
    bounds = [t for t in range(len(x)) if starts[t] or t == 0] + [len(x)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        sel = [bool(predicted[t]) for t in range(a, b)]
        if all(sel):
            words_x.append("⟦" + _word_text(tok, x[a:b]) + "⟧")
        elif not any(sel):
            words_x.append(_word_text(tok, x[a:b]))
        else:
            words_x.append("".join(f"⟦{_piece(tok, x[t])}⟧" if predicted[t] else _piece(tok, x[t]) for t in range(a, b)))
        if x_bar[a:b] == x[a:b]:
            words_xb.append(_word_text(tok, x[a:b]))
        else:
            pieces = []
            for t in range(a, b):
                p = _piece(tok, x_bar[t])
                random = corrupted[t] and x_bar[t] != x[t] and p not in ("[MASK]", "<mask>")
                pieces.append(f"«{p}»" if random else p)
            words_xb.append("".join(pieces))
    return " ".join(words_x), " ".join(words_xb)


def _count_units(unit_id: torch.Tensor, starts: torch.Tensor, in_words: bool, hist: dict[int, int]) -> None:
    """Add the lengths of the selected units to `hist`: tokens for token/word units, words for spans and n-grams."""
    T = unit_id.shape[1]
    inside = unit_id >= 0  # (B, T)
    key = (torch.arange(unit_id.shape[0]).unsqueeze(1) * (T + 1) + unit_id + 1)[inside]  # one key per (row, unit)
    weight = (starts[inside] if in_words else torch.ones_like(key, dtype=torch.bool)).long()
    if key.numel():
        _, inverse = torch.unique(key, return_inverse=True)
        lengths = torch.zeros(int(inverse.max()) + 1, dtype=torch.long).scatter_add(0, inverse, weight)
        for length, c in zip(*torch.unique(lengths, return_counts=True)):
            hist[int(length)] = hist.get(int(length), 0) + int(c)


def _scan(store, n_rows: int, rows: int, tok, special, mask_rows, in_words: bool):
    """Mask the first `n_rows` rows chunk by chunk: (counts, unit-length histogram, the first `rows` rows rendered)."""
    tot = dict(eligible=0, predicted=0, corrupted=0, masked=0, random=0, special=0, max_row=0)
    hist: dict[int, int] = {}
    shown = []
    for start in range(0, n_rows, _CHUNK_ROWS):
        index = np.arange(start, min(n_rows, start + _CHUNK_ROWS), dtype=np.int64)
        ids_np, flags_np = store.rows(index)
        ids = torch.from_numpy(ids_np)  # (B, T)
        flags = torch.from_numpy(flags_np)  # (B, T)
        mb = mask_rows(ids, torch.from_numpy(index), flags)
        sel, cor = mb.selection, mb.corruption
        target = sel.corrupt_mask if sel.corrupt_mask is not None else sel.mask  # (B, T) the corrupted positions
        elig = eligible(ids, special)  # (B, T)
        tot["eligible"] += int(elig.sum())
        tot["predicted"] += int(sel.mask.sum())
        tot["corrupted"] += int(target.sum())
        tot["masked"] += int(cor.to_mask.sum())
        tot["random"] += int(cor.to_random.sum())
        tot["special"] += int(((sel.mask | target) & ~elig).sum())
        tot["max_row"] = max(tot["max_row"], int(sel.mask.sum(1).max()))
        starts = unit_starts(elig, flags, "word")  # (B, T)
        _count_units(sel.unit_id, starts, in_words, hist)
        for r in range(min(len(index), rows - len(shown))):
            fx, fxb = _render_row(tok, ids[r].tolist(), mb.input_ids[r].tolist(), sel.mask[r].tolist(),
                                  target[r].tolist(), starts[r].tolist())
            shown.append((int(index[r]), fx, fxb))
    return tot, hist, shown


def masks_report(data, config=None, overrides=(), rows=3, as_json=False, split="train", step=0, epoch=0, max_rows=0) -> str:
    """What a masking configuration does to a prepared split: a few rows as x and x̄ with A(x) marked, and statistics
    over the split (or its first `max_rows` rows): selected share, [MASK]/random/kept shares, unit lengths, specials.

    `overrides` are `masking.key=value` (a bare `key=value` means masking.key); `config` a preset or TOML file.
    """
    for name, value in (("--rows", rows), ("--step", step), ("--epoch", epoch), ("--max-rows", max_rows)):
        if int(value) < 0:
            raise UserError(f"{name} must be >= 0, got {value}")
    dd = open_data_dir(data)
    overrides = [o if "." in str(o).split("=", 1)[0] else f"masking.{o}" for o in (overrides or ())]
    cfg = load_config(config, overrides).masking
    store = dd.open(split)
    T = int(store.seq_len)
    n_rows = len(store) if int(max_rows) <= 0 else min(len(store), int(max_rows))
    if n_rows == 0:
        raise UserError(f"the {split} split of {data} has no rows; pick another split (--split)")
    counts = dd.token_counts("masking.random_token_dist=unigram") if cfg.random_token_dist == "unigram" else None
    tok = load_tokenizer(dd.tokenizer_file) if dd.tokenizer_file is not None else None
    K = config_k_max(cfg, T)
    predict, corrupt_rate = rates_at(cfg, step)
    in_words = cfg.unit in ("span", "ngram")

    def mask_rows(ids, index, flags):  # the call training makes, keyed by row index within the split
        return mask_batch(ids, index, epoch, cfg, dd.special, dd.vocab_size, flags=flags, step=step, k_max=K,
                          token_counts=counts)

    tot, hist, shown = _scan(store, n_rows, int(rows), tok, dd.special, mask_rows, in_words)

    corrupted = max(tot["corrupted"], 1)
    stats = {
        "split": split,
        "rows": n_rows,
        "eligible_tokens": tot["eligible"],
        "selected_tokens": tot["predicted"],
        "selected_share": tot["predicted"] / max(tot["eligible"], 1),
        "corrupted_share": tot["corrupted"] / max(tot["eligible"], 1),
        "mask_share": tot["masked"] / corrupted,
        "random_share": tot["random"] / corrupted,
        "kept_share": (tot["corrupted"] - tot["masked"] - tot["random"]) / corrupted,
        "special_selected": tot["special"],
        "unit": cfg.unit,
        "unit_length_in": "words" if in_words else "tokens",
        "unit_length_histogram": {str(k): hist[k] for k in sorted(hist)},
        "expected_unit_length_probs": unit_length_probs(cfg) if in_words else None,
        "predict_rate": predict,
        "corrupt_rate": corrupt_rate,
        "step": int(step),
        "epoch": int(epoch),
        "k_max": K,
        "max_selected_in_a_row": tot["max_row"],
    }
    return json.dumps(stats, indent=2) if as_json else _format(cfg, stats, shown, hist)


def _format(cfg, stats: dict, shown: list, hist: dict[int, int]) -> str:
    """The report as text: the configuration, the rows shown, then the statistics."""
    predict, corrupt_rate, step, epoch, K = (stats[k] for k in ("predict_rate", "corrupt_rate", "step", "epoch", "k_max"))
    lines = [
        f"masking: unit={cfg.unit}, predict {predict:.3f}, corrupt {corrupt_rate:.3f} "
        f"([MASK] {cfg.mask_token_prob:g} / random {cfg.random_token_prob:g} ({cfg.random_token_dist}) / kept "
        f"{1 - cfg.mask_token_prob - cfg.random_token_prob:g}), seed {cfg.seed}, step {step}, epoch {epoch}, K {K}",
        "x: ⟦…⟧ marks A(x), the predicted positions; x̄: what the encoder sees ([MASK], «random token», or unchanged)",
        "",
    ]
    for r, fx, fxb in shown:
        lines += [f"row {r}", f"  x : {fx}", f"  x̄ : {fxb}", ""]
    n_units = sum(hist.values())
    hist_text = "  ".join(f"{k}: {100.0 * v / max(n_units, 1):.1f}%" for k, v in sorted(hist.items())[:12])
    lines += [
        f"statistics over {stats['rows']} rows of {stats['split']} ({stats['eligible_tokens']} eligible tokens):",
        f"  selected (A(x)):        {100 * stats['selected_share']:.2f}% of eligible tokens (rate {predict:.3f})",
        f"  corrupted:              {100 * stats['corrupted_share']:.2f}% (rate {corrupt_rate:.3f})",
        f"  of corrupted: [MASK] {100 * stats['mask_share']:.1f}%, random {100 * stats['random_share']:.1f}%, "
        f"kept {100 * stats['kept_share']:.1f}%",
        f"  special tokens selected: {stats['special_selected']} (must be 0)",
        f"  unit lengths ({stats['unit_length_in']}), {n_units} units: {hist_text}",
        f"  most selected in one row: {stats['max_selected_in_a_row']} (K = {K})",
    ]
    return "\n".join(lines)
