"""Use a trained model on one text: fill [MASK]s, explain the objective on one example, score a text.

MODEL is a run dir (its latest checkpoint), a checkpoint dir, or a Hugging Face dir; every function also takes the
(model, cfg, tokenizer) triple that models.load_any_model returns. All forwards run in fp32 under no_grad, sparse at the
positions asked about; nothing here trains or changes the model.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from maskedlm.config import MaskingConfig
from maskedlm.errors import UserError
from maskedlm.masking import Selection, corrupt
from maskedlm.models import load_any_model
from maskedlm.tokenizer import special_ids

_TOP_EXPLAIN = 5  # the five likeliest tokens per position: enough to see what the model confuses, one line each
_SCORE_BATCH_ROWS = 64  # pseudo-log-likelihood rows per forward: one row per scored token


def _loaded(model):
    """Accept a MODEL path or an already loaded (model, cfg, tokenizer) triple."""
    if isinstance(model, (str, Path)):
        return load_any_model(model)
    if isinstance(model, tuple) and len(model) == 3:
        return model
    raise TypeError(f"expected a MODEL path or a (model, cfg, tokenizer) triple, got {type(model).__name__}")


def _encode(tokenizer, special, cfg, text: str):
    """x as ids: [CLS] + the text's tokens + [SEP], checked against the model's positions. Returns (ids, encoding)."""
    if not text or not text.strip():
        raise UserError("the text is empty; pass the text to run on as an argument")
    # Add [CLS]/[SEP] by hand: a tokenizer may or may not carry a post-processor, and rows in training look like this.
    enc = tokenizer.encode(text, add_special_tokens=False)
    ids = [special.cls] + list(enc.ids) + [special.sep]
    limit = int(cfg.model.max_positions)
    if len(ids) > limit:
        raise UserError(
            f"the text is {len(ids)} tokens with [CLS] and [SEP], longer than the model's {limit} positions; shorten it"
        )
    return ids, enc


def _sparse_logits(model, input_ids: list[list[int]], positions: list[list[int]]) -> torch.Tensor:
    """fp32 logits at the given positions: (B, K, V), eval mode, no grad; the model's mode is restored."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(
                torch.tensor(input_ids, dtype=torch.long, device=device),
                positions=torch.tensor(positions, dtype=torch.long, device=device),
            )
    finally:
        model.train(was_training)
    return logits.float().cpu()


def _token(tokenizer, i: int) -> str:
    t = tokenizer.id_to_token(int(i))
    return t if t is not None else f"<{int(i)}>"


def fill(model, text: str, top_k: int = 5) -> dict:
    """Top-k tokens with probabilities at each [MASK] of the text (the tokenizer's own mask string)."""
    model, cfg, tokenizer = _loaded(model)
    if int(top_k) < 1:
        raise UserError(f"--top-k must be >= 1, got {top_k}")
    special = special_ids(tokenizer)
    mask_str = _token(tokenizer, special.mask)
    ids, _ = _encode(tokenizer, special, cfg, text)
    where = [i for i, t in enumerate(ids) if t == special.mask]
    if not where:
        raise UserError(f"the text has no {mask_str}; write {mask_str} where a token should be predicted, e.g. 'the {mask_str} of it'")
    probs = torch.softmax(_sparse_logits(model, [ids], [where])[0], dim=-1)  # (K, V)
    k = min(int(top_k), probs.shape[-1])
    top_p, top_i = probs.topk(k, dim=-1)
    masks, best = [], list(ids)
    for j, pos in enumerate(where):
        top = [{"token": _token(tokenizer, i), "id": int(i), "prob": float(p)} for p, i in zip(top_p[j], top_i[j])]
        masks.append({"position": pos, "top": top})
        best[pos] = int(top_i[j, 0])
    framing = {special.cls, special.sep, special.pad}
    filled = tokenizer.decode([i for i in best if i not in framing], skip_special_tokens=False)
    return {"text": text, "tokens": [_token(tokenizer, i) for i in ids], "masks": masks, "filled": filled}


def format_fill(result: dict) -> str:
    lines = [f"text:   {result['text']}", f"filled: {result['filled']}"]
    for n, m in enumerate(result["masks"], 1):
        lines.append(f"mask {n} (token position {m['position']}):")
        lines += [f"  {t['prob']:8.4f}  {t['token']}" for t in m["top"]]
    return "\n".join(lines)


def _select(mask, ids, enc, text, special) -> list[int]:
    """A(x) from --mask items: an integer is a token index into x (0 is [CLS]); a word selects all its subword tokens,
    at every occurrence (matched exactly, else ignoring case)."""
    specials = set(special.all())
    # Word spans in the original text, from the tokenizer's own word ids and offsets; sequence index = enc index + 1.
    words: dict[int, list[int]] = {}
    for j, w in enumerate(enc.word_ids):
        if w is not None and ids[j + 1] not in specials:
            words.setdefault(w, []).append(j + 1)
    # Stripped: byte-level BPE and Metaspace tokenizers count the space before a word as part of it.
    spans = {w: text[enc.offsets[p[0] - 1][0]: enc.offsets[p[-1] - 1][1]].strip() for w, p in words.items()}
    chosen: set[int] = set()
    for item in mask:
        s = str(item).strip()
        if re.fullmatch(r"[+-]?\d+", s):
            i = int(s)
            if not 0 <= i < len(ids):
                raise UserError(f"--mask index {i} is outside the text's {len(ids)} tokens (0 is [CLS], {len(ids) - 1} is [SEP])")
            if ids[i] in specials:
                raise UserError(f"--mask index {i} is a special token ({ids[i]}); special tokens are never in A(x)")
            chosen.add(i)
            continue
        hits = [w for w, span in spans.items() if span == s] or [w for w, span in spans.items() if span.lower() == s.lower()]
        if not hits:
            shown = ", ".join(repr(spans[w]) for w in sorted(spans))
            raise UserError(f"--mask {s!r} is not a word of the text (its words: {shown}); pass a word or a token index")
        for w in hits:
            chosen.update(words[w])
    return sorted(chosen)


def explain(model, text: str, mask=(), seed: int = 0) -> dict:
    """The objective's view of one example: x, A(x) from `mask`, x̄, and −log p(x_i | x̄) at each i in A(x).

    seed 0: every selected token becomes [MASK] (the clearest view of what the model predicts). Any other seed applies
    the training corruption (80/10/10 by default) via masking.corrupt, keyed by that seed, epoch 0 and row 0.
    """
    model, cfg, tokenizer = _loaded(model)
    if not mask:
        raise UserError("--mask needs at least one word or token index to put in A(x)")
    special = special_ids(tokenizer)
    ids, enc = _encode(tokenizer, special, cfg, text)
    positions = _select(mask, ids, enc, text, special)
    corrupted = list(ids)
    if int(seed) == 0:
        for i in positions:
            corrupted[i] = special.mask
    else:
        x = torch.tensor([ids], dtype=torch.long)
        sel_mask = torch.zeros_like(x, dtype=torch.bool)
        sel_mask[0, positions] = True
        selection = Selection(
            mask=sel_mask,
            positions=torch.tensor([positions], dtype=torch.long),
            valid=torch.ones(1, len(positions), dtype=torch.bool),
        )
        corrupted = corrupt(
            x, selection, torch.tensor([0], dtype=torch.long), 0, MaskingConfig(seed=int(seed)), special,
            int(cfg.model.vocab_size),
        )[0].tolist()
    logp = torch.log_softmax(_sparse_logits(model, [corrupted], [positions])[0], dim=-1)  # (K, V), fp32
    top_lp, top_i = logp.topk(min(_TOP_EXPLAIN, logp.shape[-1]), dim=-1)
    rows = []
    for j, pos in enumerate(positions):
        gold = ids[pos]
        lp = logp[j, gold]
        rows.append({
            "position": pos,
            "gold": _token(tokenizer, gold),
            "gold_id": gold,
            "p_gold": float(lp.exp()),
            "rank": 1 + int((logp[j] > lp).sum()),
            "top": [{"token": _token(tokenizer, i), "id": int(i), "p": float(v.exp())} for v, i in zip(top_lp[j], top_i[j])],
            "nll": float(-lp),
        })
    return {
        "tokens": [_token(tokenizer, i) for i in ids],
        "corrupted_ids": corrupted,
        "positions": rows,
        "total": math.fsum(r["nll"] for r in rows),
    }


def format_explain(result: dict, tokenizer=None) -> str:
    """A readable table of explain's result; x̄ shows token strings when a tokenizer is given, else changed ids."""
    tokens = result["tokens"]
    gold = {r["position"]: r["gold_id"] for r in result["positions"]}

    def shown(i, t):
        if i not in gold or t == gold[i]:
            return tokens[i]
        return _token(tokenizer, t) if tokenizer is not None else f"<id {t}>"

    xbar = [shown(i, t) for i, t in enumerate(result["corrupted_ids"])]
    lines = [
        "x    : " + " ".join(tokens),
        "A(x) : " + ", ".join(str(p) for p in gold),
        "x̄    : " + " ".join(xbar),
        "",
        f"{'i':>4}  {'x_i':<14} {'x̄_i':<14} {'p(x_i|x̄)':>10} {'rank':>6} {'−log p':>8}  top-5",
    ]
    for r in result["positions"]:
        i = r["position"]
        top = ", ".join(f"{t['token']} {t['p']:.3f}" for t in r["top"])
        lines.append(f"{i:>4}  {r['gold']:<14} {xbar[i]:<14} {r['p_gold']:>10.4f} {r['rank']:>6} {r['nll']:>8.4f}  {top}")
    lines.append(f"total Σ_{{i∈A(x)}} −log p(x_i | x̄) = {result['total']:.4f}  over |A(x)| = {len(result['positions'])}")
    return "\n".join(lines)


def score(model, text: str) -> dict:
    """Pseudo-log-likelihood: each non-special token masked in turn (one row per token, batched), Σ log p(x_i | x\\i)."""
    model, cfg, tokenizer = _loaded(model)
    special = special_ids(tokenizer)
    ids, _ = _encode(tokenizer, special, cfg, text)
    specials = set(special.all())
    where = [i for i, t in enumerate(ids) if t not in specials]
    if not where:
        raise UserError("the text has no tokens to score besides special tokens")
    nll = []
    for start in range(0, len(where), _SCORE_BATCH_ROWS):
        chunk = where[start:start + _SCORE_BATCH_ROWS]
        rows = []
        for i in chunk:
            row = list(ids)
            row[i] = special.mask
            rows.append(row)
        logp = torch.log_softmax(_sparse_logits(model, rows, [[i] for i in chunk])[:, 0], dim=-1)  # (n, V)
        gold = torch.tensor([ids[i] for i in chunk])
        nll += (-logp.gather(1, gold[:, None])[:, 0]).tolist()
    total = math.fsum(nll)
    return {
        "text": text,
        "pll": -total,
        "tokens_scored": len(where),
        "pseudo_perplexity": math.exp(total / len(where)),
        "per_token": [{"position": i, "token": _token(tokenizer, ids[i]), "nll": v} for i, v in zip(where, nll)],
    }
