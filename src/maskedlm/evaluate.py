"""Masked loss, masked-token accuracy and perplexity at a fixed evaluation mask.

The mask is the training masking code with the evaluation's own (mask_rate, seed, unit; token-level 15% by default)
at epoch 0 and the rows' real indices in the split, so a number is comparable across runs, checkpoints and world
sizes. Micro-batches are streamed, shared out between ranks, and only the logits at A(x) exist; nothing here trains
or stores predictions.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from maskedlm import distributed as dist
from maskedlm import masking
from maskedlm.config import EvalConfig, load_config
from maskedlm.data.shards import FLAG_DOC_START, FLAG_WORD_START, DataDir, mixture_weights, open_sources
from maskedlm.errors import UserError
from maskedlm.models import check_compatible, load_any_model
from maskedlm.objective import masked_accuracy_counts, masked_cross_entropy
from maskedlm.tokenizer import special_ids


def _check_eval(store, cfg: EvalConfig, precision: str) -> int:
    """The number of rows to evaluate; UserError for an empty split or an unknown precision."""
    n_rows = len(store) if cfg.max_rows <= 0 else min(len(store), cfg.max_rows)
    if n_rows == 0:
        raise UserError("the evaluation split has no rows; prepare the data with a validation split (--val-fraction > 0) or pick another split")
    if precision not in ("fp32", "bf16"):
        raise UserError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    return n_rows


def _eval_logits(model, store, cfg: EvalConfig, special, vocab_size: int, device, precision: str, n_rows: int, items):
    """For each micro-batch b in `items` (None: a forward whose result is dropped): (b, masked batch, flags, logits at
    A(x)). The model is in eval mode and no gradient is kept while this runs."""
    mask_cfg = cfg.masking()
    # K depends only on (T, rate, unit), as in training, so every micro-batch has the same shape.
    k_max = masking.config_k_max(mask_cfg, store.seq_len)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    mb = cfg.micro_batch_rows
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in items:
                start = (b or 0) * mb
                index = np.arange(start, min(n_rows, start + mb), dtype=np.int64)
                ids, flags = store.rows(index)
                flags = torch.as_tensor(flags)  # (B, T)
                batch = masking.mask_batch(torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(index), 0, mask_cfg,
                                           special, vocab_size, flags=flags, k_max=k_max)
                with autocast:
                    logits = model(batch.input_ids.to(device), positions=batch.positions.to(device),
                                   doc_starts=((flags & FLAG_DOC_START) != 0).to(device))  # (B, K, V)
                yield b, batch, flags, logits
    finally:
        model.train(was_training)


def perplexity(loss: float) -> float:
    """exp(mean masked loss); inf where exp would overflow a float (loss >= 700) rather than raise."""
    return math.exp(loss) if loss < 700 else float("inf")


def _metrics(nll_sum: float, correct: int, count: int, rows: int) -> dict:
    loss = nll_sum / count
    return {"loss": loss, "accuracy": correct / count, "perplexity": perplexity(loss), "tokens": count, "rows": rows}


def weighted_metrics(weights: list[float], per: list[dict | None]) -> dict:
    """A mixture's numbers: loss and accuracy of its sources weighted by the mixture's weights, renormalised over the
    sources that have numbers (None: a source without the split); tokens and rows summed; each source's under
    "sources". The one place periodic evaluation in training and `maskedlm eval` on several data dirs combine them."""
    have = [(wi, r) for wi, r in zip(weights, per) if r is not None]
    total = sum(wi for wi, _ in have)
    loss = sum(wi * r["loss"] for wi, r in have) / total
    return {"loss": loss, "accuracy": sum(wi * r["accuracy"] for wi, r in have) / total, "perplexity": perplexity(loss),
            "tokens": sum(r["tokens"] for _, r in have), "rows": sum(r["rows"] for _, r in have), "sources": per}


def evaluate(model, store, cfg: EvalConfig, special, vocab_size: int, device="cpu", precision: str = "fp32") -> dict:
    """Σ −log p(x_i | x̄) / |A| over the split (or its first cfg.max_rows rows), with accuracy and perplexity.

    `tokens` is the number of scored positions |A| (the loss's denominator); `rows` the rows read. Under torchrun
    every rank must call it: the micro-batches are shared out between ranks and the sums reduced, giving every rank
    the numbers one process would get.
    """
    n_rows = _check_eval(store, cfg, precision)
    device = torch.device(device)
    n_batches = -(-n_rows // cfg.micro_batch_rows)
    # One row of (Σ −log p, correct, count) per micro-batch of the whole split. A rank fills only its own micro-batches
    # and the all-reduce adds zeros to the others, which is exact; the totals are then summed in micro-batch order on
    # every rank. So the numbers do not depend on the world size: micro-batch b holds the same rows (and, keyed by
    # row index, the same mask) at any world size, and float64 sums taken in a fixed order give the same bits.
    sums = torch.zeros(n_batches, 3, dtype=torch.float64, device=device)
    # A None item: this rank has run out of micro-batches but must still take part in the forward (a sharded model
    # gathers its weights collectively); it runs micro-batch 0 again and drops the result.
    for b, batch, _, logits in _eval_logits(model, store, cfg, special, vocab_size, device, precision, n_rows,
                                            dist.shard_items(n_batches)):
        if b is None:
            continue
        targets = batch.targets.to(device)  # (B, K)
        c, k = masked_accuracy_counts(logits, targets)
        sums[b, 0] = masked_cross_entropy(logits, targets, reduction="sum").double()
        sums[b, 1], sums[b, 2] = c.double(), k.double()
    dist.all_reduce_sum(sums)
    nll_sum = 0.0
    for v in sums[:, 0].tolist():
        nll_sum += v
    correct, count = int(sums[:, 1].sum()), int(sums[:, 2].sum())
    if count == 0:
        raise UserError(f"no position was selected for evaluation in {n_rows} rows; raise eval.mask_rate (got {cfg.mask_rate})")
    return _metrics(nll_sum, correct, count, n_rows)


def score_positions(model, store, cfg: EvalConfig, special, vocab_size: int, device="cpu", precision: str = "fp32") -> dict:
    """Every scored position of the evaluation mask, one entry each (one process; for reports, not for training).

    Returns numpy arrays of equal length: `gold` x_i, `pred` the top-1 token, `p_gold` p(x_i | x̄), `confidence` the
    top-1 probability, `position` the index in the row, `word_start` whether x_i starts a word, `row` the row index.
    Σ −log p_gold / len equals `evaluate`'s loss on the same split and config (up to float summation order).
    """
    n_rows = _check_eval(store, cfg, precision)
    device = torch.device(device)
    out = {k: [] for k in ("gold", "pred", "p_gold", "confidence", "position", "word_start", "row")}
    items = range(-(-n_rows // cfg.micro_batch_rows))
    for b, batch, flags, logits in _eval_logits(model, store, cfg, special, vocab_size, device, precision, n_rows, items):
        valid = batch.valid  # (B, K)
        probs = torch.softmax(logits.float().cpu(), dim=-1)  # (B, K, V) fp32, as the loss takes it
        gold = batch.targets.clamp(min=0)  # (B, K)
        conf, pred = probs.max(dim=-1)  # (B, K), (B, K)
        rows = torch.arange(valid.shape[0]).unsqueeze(1).expand_as(valid)  # (B, K)
        out["gold"].append(gold[valid])
        out["pred"].append(pred[valid])
        out["p_gold"].append(torch.gather(probs, -1, gold.unsqueeze(-1)).squeeze(-1)[valid])
        out["confidence"].append(conf[valid])
        out["position"].append(batch.positions[valid])
        out["word_start"].append(((flags[rows, batch.positions] & FLAG_WORD_START) != 0)[valid])
        out["row"].append(rows[valid] + b * cfg.micro_batch_rows)
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def _eval_overrides(cfg, overrides) -> EvalConfig:
    """Apply `eval.key=value` overrides (the only section evaluation reads) with the config loader's own coercion."""
    for item in overrides or ():
        if not str(item).strip().startswith("eval."):
            raise UserError(f"evaluation takes only eval.KEY=VALUE overrides (e.g. eval.max_rows=100), got {item!r}")
    return load_config(cfg, overrides).eval


def evaluate_model(model_path, data, split: str = "val", overrides=(), device: str | None = None) -> dict:
    """`maskedlm eval`: load MODEL (run, checkpoint or Hugging Face dir), check it fits DATA_DIR, evaluate a split.

    split "all" evaluates train and val and pools them (each split keeps its own row indices, so its mask is the
    same as when evaluated alone); the per-split numbers are under "splits".
    """
    if split not in ("val", "train", "all"):
        raise UserError(f"split must be val, train or all, got {split!r}")
    # Under torchrun (several processes) the micro-batches are shared out over the ranks, as during training; every
    # rank returns the numbers one process would. A process group the caller already set up is left to the caller.
    own_group = not dist.in_process_group()
    info = dist.init(device or "auto") if own_group else dist.info()
    try:
        return _evaluate_model(model_path, data, split, overrides, info.device)
    finally:
        if own_group:
            dist.shutdown()


def _evaluate_model(model_path, data, split: str, overrides, device) -> dict:
    """One data dir's numbers; for several (a mixture), each one's under "sources" and their total weighted by the
    run's data.weights (by the sources' train tokens when it has none), as periodic evaluation in training does."""
    sources = open_sources(data)
    model, cfg, tokenizer = load_any_model(model_path)
    per = [_evaluate_source(model, cfg, tokenizer, d, split, overrides, device, model_path) for d in sources]
    if len(per) == 1:
        return per[0]
    w = mixture_weights(cfg.data.weights, sources)
    combined = weighted_metrics(w, per)
    per_source = combined.pop("sources")
    return {**combined, "weights": w, "sources": per_source}  # in the order `maskedlm eval` prints them


def _evaluate_source(model, cfg, tokenizer, data_dir: DataDir, split: str, overrides, device, model_path) -> dict:
    data = data_dir.path
    check_compatible(cfg.model, tokenizer, data_dir)
    ecfg = _eval_overrides(cfg, overrides)
    special = special_ids(tokenizer)
    model.to(device)
    names = ["train", "val"] if split == "all" else [split]
    per = {}
    for name in names:
        store = data_dir.open(name)
        if len(store) == 0:
            if split == "all":
                continue
            raise UserError(f"data {data} has no {name} rows; prepare with --val-fraction > 0 or use --split train")
        per[name] = evaluate(model, store, ecfg, special, int(cfg.model.vocab_size), device=device)
    if not per:
        raise UserError(f"data {data} has no rows to evaluate")
    if split == "all":
        result = _metrics(sum(m["loss"] * m["tokens"] for m in per.values()),
                          sum(m["accuracy"] * m["tokens"] for m in per.values()),
                          sum(m["tokens"] for m in per.values()), sum(m["rows"] for m in per.values()))
        result["splits"] = per
    else:
        result = dict(per[split])
    result.update(split=split, mask_rate=ecfg.mask_rate, seed=ecfg.seed, unit=ecfg.unit, model=str(Path(model_path)), data=str(Path(data)))
    return result
