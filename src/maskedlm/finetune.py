"""`maskedlm finetune`: fine-tune any MODEL on the user's labelled data (classify, regress, tokens), or probe it.

One seed: AdamW and the warmup + linear-decay schedule of optim.py, Σ loss / count of labelled items per step, clipping,
a skipped update on a non-finite loss; evaluation each epoch (or every N steps), the best state by the task's main
metric, early stopping. --seeds N repeats it; DIR/best/ is a transformers directory, checked against transformers.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from tokenizers import Tokenizer, processors

from maskedlm import distributed as dist
from maskedlm import downstream as ds
from maskedlm.config import FinetuneConfig, OptimConfig, load_finetune_config
from maskedlm.errors import UserError
from maskedlm.files import atomic_write_text, building, check_out, replace_dir
from maskedlm.hf import FINETUNE_MARKER, load_any_model
from maskedlm.metrics import StepProgress
from maskedlm.optim import Schedule, build_optimizer
from maskedlm.probe import run_probe
from maskedlm.tokenizer import save_tokenizer, special_ids
from maskedlm.train import OptimizerStep

MARKER = FINETUNE_MARKER  # how --overwrite recognises a directory that finetune wrote (and MODEL finds best/)
CHECK_TOLERANCE = 1e-4  # DIR/best/ against transformers' logits, as `export` checks: a wrong key map is far above it


def _autocast(fcfg: FinetuneConfig, device: torch.device):
    bf16 = fcfg.precision == "bf16" or (fcfg.precision == "auto" and device.type == "cuda"
                                        and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


@torch.no_grad()
def predict(model: ds.TaskModel, data: ds.TaskData, split: str, fcfg: FinetuneConfig, device) -> list:
    """Predictions for every example of a split, spelled as the files spell labels (names, numbers, tag lists)."""
    enc, pad = data.encoded[split], 0
    was = model.training
    model.eval()
    out = [None] * len(enc.ids)
    for index in length_batches(enc, fcfg.eval_batch_rows):
        ids, mask, types = (t.to(device) for t in ds.collate(enc, index, pad))
        with _autocast(fcfg, device):
            logits = model(ids, mask, types).float().cpu()  # (B, L) or (B, T, L)
        if data.task == "regress":
            got = logits[:, 0].tolist()
        elif data.task == "classify":
            got = [data.names[k] for k in logits.argmax(-1).tolist()]
        else:
            best = logits.argmax(-1)  # (B, T)
            fallback = ds.fallback_tag(data.names)
            got = [[data.names[best[j, p]] if p >= 0 else fallback for p in enc.first[i]] for j, i in enumerate(index)]
        for i, g in zip(index, got):
            out[i] = g
    model.train(was)
    return out


def length_batches(enc: ds.Encoded, batch_rows: int) -> list[list[int]]:
    """Example indices sorted by length (longest first) and cut into batches: each batch is padded to its own longest
    row, so sorted batches carry almost no padding, and padding changes no logit (the attention mask hides it)."""
    order = sorted(range(len(enc.ids)), key=lambda i: -len(enc.ids[i]))
    return [order[s:s + batch_rows] for s in range(0, len(order), batch_rows)]


def _evaluate(model, data, split, fcfg, device) -> tuple[dict, list]:
    pred = predict(model, data, split, fcfg, device)
    return ds.score(data.task, data.names, data.examples[split].labels, pred), pred


def _step(stepper: OptimizerStep, model, step: int, batch, task: str, autocast) -> float:
    """One optimizer step, the same as pretraining's (OptimizerStep): Σ loss over the batch's labelled items / their
    count, clipped, and skipped when the loss or gradient is not finite. Returns the step's loss."""
    ids, mask, types, labels = batch
    count = labels.numel() if task == "regress" else int((labels != ds.IGNORE).sum())  # known before the forward

    def loss_sums(_):
        with autocast:
            logits = model(ids, mask, types)  # (B, L) or (B, T, L)
        return ds.loss_sum(logits, labels, task)[0], torch.zeros((), device=ids.device)

    _, count, sums, _, _ = stepper([batch], count, loss_sums, step)
    return float(sums[0] / count.clamp(min=1))


# Long: the whole life of one seed (set-up, epochs, evaluation, best state, early stop) reads best in one place.
def train_seed(net, data: ds.TaskData, fcfg: FinetuneConfig, seed: int, device, log, label: str = "") -> dict:
    """Fine-tune a fresh copy of `net` with `seed` at finetune.lr (a number here); returns {seed, best_step, eval
    (best), state (best weights)}. Progress: a bar on a terminal, else a line every tenth of the steps and per eval."""
    info = dist.info()
    torch.manual_seed(seed + info.rank)  # dropout: rank 0 of N draws as one process would
    model = ds.TaskModel.from_mlm(net, data.task, len(data.names) if data.task != "regress" else 1,
                                  fcfg.dropout, seed).to(device)
    sync = dist.wrap_model(model, "ddp")  # under torchrun each rank takes its share of every batch; else the model
    enc, labels = data.encoded["train"], data.examples["train"].labels
    n = len(enc.ids)
    per_epoch = math.ceil(n / fcfg.batch_rows)
    total = per_epoch * fcfg.epochs if fcfg.epochs else fcfg.max_steps
    total = min(total, fcfg.max_steps) if fcfg.max_steps else total
    ocfg = OptimConfig(lr=fcfg.lr, weight_decay=fcfg.weight_decay, schedule="linear",
                       warmup_steps=int(fcfg.warmup_fraction * total), clip_grad_norm=1.0)
    optimizer = build_optimizer(model, ocfg, device)
    params = [p for p in model.parameters() if p.requires_grad]
    stepper = OptimizerStep(sync, optimizer, Schedule(ocfg, total), params, ocfg.clip_grad_norm, device)
    autocast, order_gen = _autocast(fcfg, device), torch.Generator().manual_seed(seed)
    every = fcfg.eval_every_steps or per_epoch
    progress = StepProgress(total, label or f"seed {seed}", quiet=not dist.is_main())
    best = {"seed": seed, "best_step": 0, "eval": None, "state": None}
    since_best, step, losses = 0, 0, []
    model.train()
    while step < total:
        perm = torch.randperm(n, generator=order_gen).tolist()
        for start in range(0, n, fcfg.batch_rows):
            index = perm[start:start + fcfg.batch_rows]
            if len(index) < info.world_size:  # a last batch too small to give every rank a row: left out
                break
            index = index[info.rank::info.world_size]  # this rank's share; the step's count is summed over ranks
            ids, mask, types = ds.collate(enc, index, 0)
            y = ds.label_tensor(data.task, labels, index, data.names, enc, ids.shape[1])
            batch = tuple(t.to(device) for t in (ids, mask, types, y))
            losses.append(_step(stepper, sync, step, batch, data.task, autocast))
            step += 1
            progress.step(loss=losses[-1])
            if step % every == 0 or step == total:
                metrics, _ = _evaluate(model, data, "eval", fcfg, device)
                main = ds.main_metric(data.task, metrics)
                progress.note(**{f"eval {main}": metrics[main]})
                log({"seed": seed, "step": step, "epoch": (step - 1) // per_epoch, "split": "eval",
                     "train_loss": sum(losses) / len(losses), **metrics})
                losses = []
                if best["eval"] is None or metrics[main] > best["eval"][main]:
                    best.update(best_step=step, eval=metrics,
                                state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
                    since_best = 0
                else:
                    since_best += 1
                if fcfg.patience and since_best >= fcfg.patience:
                    progress.close()
                    return best
            if step >= total:
                break
    progress.close()
    return best


def _model_for(net, data, fcfg, state) -> ds.TaskModel:
    model = ds.TaskModel.from_mlm(net, data.task, len(data.names) if data.task != "regress" else 1, fcfg.dropout, 0)
    model.load_state_dict(state)
    return model.eval()


def save_hf(model: ds.TaskModel, data: ds.TaskData, tok, out: Path) -> float | None:
    """Write `model` as transformers' class into `out` (config, safetensors, tokenizer); when transformers is
    installed, load it back and return the largest logit difference on the eval examples (RuntimeError above 1e-4)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    sp = special_ids(tok)
    if tok.post_processor is None:  # so transformers' tokenizer frames texts as we trained on them
        tok = Tokenizer.from_str(tok.to_str())
        cls, sep = tok.id_to_token(sp.cls), tok.id_to_token(sp.sep)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1", special_tokens=[(cls, sp.cls), (sep, sp.sep)])
    atomic_write_text(out / "config.json", json.dumps(ds.hf_task_config(model, data.names, sp.as_dict()), indent=2))
    save_file(ds.to_hf_task_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    save_tokenizer(tok, out)
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    tcfg["model_max_length"] = int(model.cfg.max_positions)
    atomic_write_text(out / "tokenizer_config.json", json.dumps(tcfg, indent=2) + "\n")
    (out / "special_ids.json").unlink(missing_ok=True)  # ours, not transformers'
    try:
        import transformers
    except ImportError:
        return None
    return check_with_transformers(model, data, out, transformers)


def check_with_transformers(model: ds.TaskModel, data: ds.TaskData, out: Path, transformers) -> float:
    auto = (transformers.AutoModelForSequenceClassification if model.sequence
            else transformers.AutoModelForTokenClassification)
    bar = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # a check, not a download: no "Loading weights" bar
    try:
        theirs = auto.from_pretrained(str(out), local_files_only=True, attn_implementation="sdpa").eval()
    finally:
        if bar:
            transformers.utils.logging.enable_progress_bar()
    enc = data.encoded["eval"]
    index = list(range(min(8, len(enc.ids))))
    ids, mask, types = ds.collate(enc, index, 0)
    kwargs = {"token_type_ids": types} if model.cfg.family == "bert" else {}
    with torch.no_grad():
        ours = model.cpu().eval()(ids, mask, types).float()  # (B, L) or (B, T, L)
        hf = theirs(input_ids=ids, attention_mask=mask, **kwargs).logits.float()
    if not model.sequence:  # padded positions carry nothing; compare where there are tokens
        ours, hf = ours[mask.bool()], hf[mask.bool()]
    diff = (ours - hf).abs().max().item()
    if not diff <= CHECK_TOLERANCE:
        raise RuntimeError(f"fine-tuned model check failed: transformers' logits differ from ours by {diff:.3g}")
    return diff


def _stats(runs: list[dict], split: str) -> dict:
    keys = runs[0][split].keys() if runs and runs[0].get(split) else []
    return {k: ds.summarize([r[split][k] for r in runs]) for k in keys}


def _prediction_lines(data: ds.TaskData, pred: list) -> str:
    ex = data.examples["test"]
    lines = []
    for i, p in enumerate(pred):
        rec = {"index": i, "prediction": p}
        if ex.labels is not None:
            rec["label"] = ex.labels[i]
        lines.append(json.dumps(rec))
    return "".join(line + "\n" for line in lines)


# Long: the command's whole sequence (check, read, run seeds or probe, write, summarise) kept in order in one place.
def finetune(model, train, eval, out, task: str = "classify", test=None, text_field=None, pair_field=None,
             label_field=None, seeds: int = 1, probe: bool = False, overrides=(), overwrite: bool = False,
             device: str | None = None) -> dict:
    """`maskedlm finetune`: returns (and the CLI prints) {task, metric, eval, test, seeds, best_step, ...}; writes
    DIR/metrics.jsonl, DIR/predictions.jsonl (with --test) and DIR/best/ (not with --probe). Nothing is written
    when an input is refused. Under torchrun every rank trains on its share of each batch and rank 0 writes."""
    fcfg = load_finetune_config(overrides)
    if int(seeds) < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    # --out never over, inside or around an input; --overwrite replaces only an earlier finetune's output
    inputs = [x for x in (model, train, eval, test) if isinstance(x, (str, os.PathLike))]
    out = check_out(out, inputs=inputs, overwrite=overwrite, ours=lambda d: (d / MARKER).is_file(), what="a finetune output")
    net, cfg, tok = load_any_model(model, mlm_head=False)  # the encoder is what is fine-tuned; a fine-tuned one too
    ds.check_tokenizer(net, tok, model)
    sp = special_ids(tok)
    max_len = min(fcfg.max_len, int(net.cfg.max_positions))
    data = ds.load_task(tok, sp, task, {"train": train, "eval": eval, "test": test}, text_field, pair_field,
                        label_field, max_len, warn=lambda m: print(m, file=sys.stderr))
    own_group = not dist.in_process_group()  # a group the caller set up is left to the caller
    info = dist.init(device or "auto") if own_group else dist.info()
    try:
        if len(data.examples["train"].labels) < info.world_size:
            raise UserError(f"--train has {len(data.examples['train'].labels)} examples, fewer than the "
                            f"{info.world_size} processes; run on fewer processes")
        net = net.to(info.device)
        records: list[dict] = []
        if probe:
            if seeds > 1:  # the probe has no random part: features are fixed, L-BFGS starts from zeros
                dist.print0("note: --seeds does not apply to --probe (it is deterministic); one run", file=sys.stderr)
            result = run_probe(net, data, fcfg.eval_batch_rows, info.device, log=records.append)
            runs, pred, best_model = [result], result.pop("test_predictions", None), None
            lr, record = None, None
        else:
            runs, pred, best_model, lr, record = _fine_tune_seeds(net, data, fcfg, int(seeds), info.device,
                                                                  records.append)
        check = dist.everywhere(_write_out, out, inputs, overwrite, records, data, pred, best_model, tok, main_only=True)
    finally:
        if own_group:
            dist.shutdown()
    main = ds.main_metric(task, runs[0]["eval"])
    best = max(runs, key=lambda r: r["eval"][main])
    stats = {"eval": _stats(runs, "eval"), "test": _stats(runs, "test")}
    return {"task": task, "metric": main, "probe": bool(probe),
            "eval": {k: v["median"] for k, v in stats["eval"].items()},
            "test": {k: v["median"] for k, v in stats["test"].items()} or None,
            "stats": stats, "seeds": [{k: r.get(k) for k in ("seed", "best_step", "eval", "test")} for r in runs],
            "best_step": best.get("best_step"), "best_seed": best.get("seed"), "lr": lr, "lr_sweep": record,
            "labels": data.names,
            "out": str(out), "best": str(out / "best") if best_model is not None else None,
            "max_abs_diff_transformers": check}


def _write_out(out: Path, inputs, overwrite: bool, records, data, pred, best_model, tok) -> float | None:
    """DIR as a whole (marker, metrics.jsonl, predictions.jsonl, best/), built beside it and renamed into place;
    returns best/'s largest logit difference from transformers (None when not checked)."""
    check = None
    with building(out, "finetune") as tmp:
        atomic_write_text(tmp / MARKER, "written by maskedlm finetune; --overwrite may replace this directory\n")
        if best_model is not None:
            check = save_hf(best_model, data, tok, tmp / "best")
        atomic_write_text(tmp / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        if pred is not None:
            atomic_write_text(tmp / "predictions.jsonl", _prediction_lines(data, pred))
        check_out(out, inputs=inputs, overwrite=overwrite, ours=lambda d: (d / MARKER).is_file(),
                  what="a finetune output")  # again: --out may have changed while training
        replace_dir(tmp, out)
    return check


def sweep(net, data: ds.TaskData, fcfg: FinetuneConfig, dev, log) -> tuple[float, list[dict], dict]:
    """finetune.lr=auto: the first seed at every rate of finetune.lr_grid, each for the whole budget; the rate whose
    run scores best on --eval wins (a tie goes to the smaller rate). Returns (rate, the grid's points, the winner's
    run, which is then the first of the seeds: the sweep costs len(lr_grid) - 1 runs more than --seeds alone)."""
    points, best = [], None
    for lr in fcfg.lr_grid:
        t0 = time.perf_counter()
        r = train_seed(net, data, replace(fcfg, lr=lr), fcfg.seed, dev, lambda rec, lr=lr: log({"lr": lr, **rec}),
                       label=f"lr {lr:g} seed {fcfg.seed}")
        main = ds.main_metric(data.task, r["eval"])
        points.append({"lr": lr, "eval": r["eval"], "best_step": r["best_step"], "wall_s": time.perf_counter() - t0})
        if best is None or r["eval"][main] > best[1]["eval"][main]:
            best = (lr, r)
    return best[0], points, best[1]


def _seed_runs(net, data, fcfg, seeds: int, dev, log) -> tuple[FinetuneConfig, list[dict], dict | None]:
    """(the config at the rate used, each seed's run, the sweep's record or None when finetune.lr is a number)."""
    runs, record = [], None
    if fcfg.lr == "auto":
        t0 = time.perf_counter()
        n = len(fcfg.lr_grid)
        dist.print0(f"finetune.lr=auto: {n} rates ({', '.join(f'{x:g}' for x in fcfg.lr_grid)}) x seed {fcfg.seed}, "
                    f"then {seeds - 1} more seed(s) at the best: {n + seeds - 1} runs, {(n + seeds - 1) / seeds:.2g}x "
                    f"the cost of --seeds {seeds} at a given finetune.lr", file=sys.stderr)
        lr, points, first = sweep(net, data, fcfg, dev, log)
        fcfg, runs = replace(fcfg, lr=lr), [first]
        record = {"picked": lr, "grid": points, "runs": n + seeds - 1, "cost_vs_fixed_lr": (n + seeds - 1) / seeds,
                  "sweep_s": time.perf_counter() - t0}
        dist.print0(f"finetune.lr=auto: picked {lr:g} in {record['sweep_s']:.0f} s; eval " + ", ".join(
            f"{p['lr']:g}: {p['eval'][ds.main_metric(data.task, p['eval'])]:.4f}" for p in points), file=sys.stderr)
    for k in range(len(runs), seeds):
        runs.append(train_seed(net, data, fcfg, fcfg.seed + k, dev, log))
    return fcfg, runs, record


def _fine_tune_seeds(net, data, fcfg, seeds: int, dev, log):
    """Each seed trained (after the sweep when finetune.lr=auto) and its best state scored on test; returns (runs,
    test predictions, the best seed's model, the rate used, the sweep's record or None)."""
    fcfg, runs, record = _seed_runs(net, data, fcfg, seeds, dev, log)
    for r in runs:
        if "test" in data.examples and data.examples["test"].labels is not None:
            model = _model_for(net, data, fcfg, r["state"]).to(dev)
            r["test"], _ = _evaluate(model, data, "test", fcfg, dev)
            log({"seed": r["seed"], "step": r["best_step"], "split": "test", **r["test"]})
    main = ds.main_metric(data.task, runs[0]["eval"])
    best = max(runs, key=lambda r: r["eval"][main])
    model = _model_for(net, data, fcfg, best["state"]).to(dev)
    pred = predict(model, data, "test", fcfg, dev) if "test" in data.examples else None
    for r in runs:
        r.pop("state", None)
    return runs, pred, model, fcfg.lr, record
