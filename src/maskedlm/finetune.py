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
from maskedlm.checkpoint import write_weights
from maskedlm.config import SEED_LIMIT, OptimConfig
from maskedlm.errors import UserError
from maskedlm.files import atomic_write_text, building, check_out, replace_dir
from maskedlm.metrics import StepProgress
from maskedlm.models import FINETUNE_MARKER, is_finetune_dir, load_any_model
from maskedlm.optim import Schedule, build_optimizer
from maskedlm.probe import run_probe
from maskedlm.step import OptimizerStep
from maskedlm.tasks import TaskData, load_task
from maskedlm.tasks.config import FinetuneConfig, load_finetune_config
from maskedlm.tasks.encode import Encoded, collate
from maskedlm.tasks.heads import TaskModel, hf_task_config, to_hf_task_state_dict
from maskedlm.tasks.metrics import summarize
from maskedlm.tokenizer import save_tokenizer, special_ids

MAX_SEEDS = 100  # --seeds: each is a whole run; 1000 would run for days where a user meant 10
CHECK_TOLERANCE = 1e-4  # DIR/best/ against transformers' logits, as `export` checks: a wrong key map is far above it


def _cpu_bf16() -> bool:
    """Whether oneDNN runs bf16 on this CPU (AVX-512 or newer); a torch without the query counts as no."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _autocast(fcfg: FinetuneConfig, device: torch.device):
    if fcfg.precision == "auto":
        bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else device.type == "cpu" and _cpu_bf16()
    else:
        bf16 = fcfg.precision == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


@torch.no_grad()
def predict(model: TaskModel, data: TaskData, split: str, fcfg: FinetuneConfig, device) -> list:
    """Predictions for every example of a split, spelled as the files spell labels (names, numbers, tag lists)."""
    enc, task = data.encoded[split], data.task
    was = model.training
    model.eval()
    out = [None] * len(enc.ids)
    for index in length_batches(enc, fcfg.eval_batch_rows):
        ids, mask, types = (t.to(device) for t in collate(enc, index, 0))
        with _autocast(fcfg, device):
            logits = model(ids, mask, types).float().cpu()  # (B, L) or (B, T, L)
        firsts = [enc.first[i] for i in index] if enc.first is not None else None
        for i, p in zip(index, task.decode(task.item_scores(logits, index, enc), data.names, firsts)):
            out[i] = p
    model.train(was)
    return out


def length_batches(enc: Encoded, batch_rows: int) -> list[list[int]]:
    """Example indices sorted by length (longest first) and cut into batches: each batch is padded to its own longest
    row, so sorted batches carry almost no padding, and padding changes no logit (the attention mask hides it)."""
    order = sorted(range(len(enc.ids)), key=lambda i: -len(enc.ids[i]))
    return [order[s:s + batch_rows] for s in range(0, len(order), batch_rows)]


def _evaluate(model, data, split, fcfg, device) -> tuple[dict, list]:
    pred = predict(model, data, split, fcfg, device)
    return data.task.score(data.names, data.examples[split].labels, pred), pred


def _step(stepper: OptimizerStep, model, step: int, batch, task, autocast) -> float:
    """One optimizer step, the same as pretraining's (OptimizerStep): Σ loss over the batch's labelled items / their
    count, clipped, and skipped when the loss or gradient is not finite. Returns the step's loss."""
    ids, mask, types, labels = batch
    count = task.count(labels)  # known before the forward

    def loss_sums(_):
        with autocast:
            logits = model(ids, mask, types)  # (B, L) or (B, T, L)
        return task.loss_sum(logits, labels)[0], torch.zeros((), device=ids.device)

    _, count, sums, _, _ = stepper([batch], count, loss_sums, step)
    return float(sums[0] / count.clamp(min=1))


def _setup_seed(net, data: TaskData, fcfg: FinetuneConfig, seed: int, device, total: int):
    """A fresh task model for `seed`, its DDP wrapper, and the optimizer step: AdamW, warmup + linear decay."""
    model = TaskModel.from_mlm(net, data.task, data.task.outputs(data.names), fcfg.dropout_for(net.cfg), seed).to(device)
    sync = dist.wrap_model(model, "ddp")  # under torchrun each rank takes its share of every batch; else the model
    ocfg = OptimConfig(lr=fcfg.lr, weight_decay=fcfg.weight_decay, schedule="linear",
                       warmup_steps=int(fcfg.warmup_fraction * total), clip_grad_norm=1.0)
    optimizer = build_optimizer(model, ocfg, device)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, sync, OptimizerStep(sync, optimizer, Schedule(ocfg, total), params, ocfg.clip_grad_norm, device)


def _batches(n: int, batch_rows: int, seed: int):
    """This rank's share of each batch, epoch after epoch without end, in an order drawn from `seed`."""
    order_gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=order_gen).tolist()
        for start in range(0, n, batch_rows):
            index = perm[start:start + batch_rows]
            share = dist.shard_list(index)  # this rank's share; the step's count is summed over ranks
            if share is None:  # a last batch too small to give every rank a row: left out
                break
            yield share


def _keep_best(best: dict, metrics: dict, step: int, model, task) -> bool:
    """Record metrics and weights in `best` when they beat it on the task's main metric; returns whether they did."""
    main = task.main_metric(metrics)
    if best["eval"] is not None and not metrics[main] > best["eval"][main]:
        return False
    best.update(best_step=step, eval=metrics, state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    return True


def _total_steps(n: int, fcfg: FinetuneConfig) -> tuple[int, int]:
    """(steps per epoch, steps in all): finetune.epochs of the data, capped by finetune.max_steps when set."""
    per_epoch = math.ceil(n / fcfg.batch_rows)
    total = per_epoch * fcfg.epochs if fcfg.epochs else fcfg.max_steps
    return per_epoch, min(total, fcfg.max_steps) if fcfg.max_steps else total


def train_seed(net, data: TaskData, fcfg: FinetuneConfig, seed: int, device, log, label: str = "") -> dict:
    """Fine-tune a fresh copy of `net` with `seed` at finetune.lr (a number here), evaluating every
    finetune.eval_every_steps (or epoch) and stopping early after finetune.patience evaluations without a better one;
    returns {seed, best_step, eval, state} (best). Progress: a bar on a terminal, else lines (stderr)."""
    task = data.task
    dist.seed_ranks(seed)  # dropout: rank 0 of N draws as one process would
    enc, labels = data.encoded["train"], data.examples["train"].labels
    per_epoch, total = _total_steps(len(enc.ids), fcfg)
    model, sync, stepper = _setup_seed(net, data, fcfg, seed, device, total)
    autocast, every = _autocast(fcfg, device), fcfg.eval_every_steps or per_epoch
    batches = _batches(len(enc.ids), fcfg.batch_rows, seed)
    best = {"seed": seed, "best_step": 0, "eval": None, "state": None}
    since_best, losses = 0, []
    progress = StepProgress(total, label or f"seed {seed}", quiet=not dist.is_main())
    model.train()
    for step in range(1, total + 1):
        index = next(batches)
        ids, mask, types = collate(enc, index, 0)
        y = task.targets(labels, index, data.names, enc, ids.shape[1])
        losses.append(_step(stepper, sync, step - 1, tuple(t.to(device) for t in (ids, mask, types, y)), task, autocast))
        progress.step(loss=losses[-1])
        if step % every == 0 or step == total:
            metrics, _ = _evaluate(model, data, "eval", fcfg, device)
            progress.note(**{f"eval {task.main_metric(metrics)}": metrics[task.main_metric(metrics)]})
            log({"seed": seed, "step": step, "epoch": (step - 1) // per_epoch, "split": "eval",
                 "train_loss": sum(losses) / len(losses), **metrics})
            losses = []
            since_best = 0 if _keep_best(best, metrics, step, model, task) else since_best + 1
            if fcfg.patience and since_best >= fcfg.patience:
                break
    progress.close()
    return best


def _model_for(net, data, fcfg, state) -> TaskModel:
    model = TaskModel.from_mlm(net, data.task, data.task.outputs(data.names), fcfg.dropout_for(net.cfg), 0)
    model.load_state_dict(state)
    return model.eval()


def save_hf(model: TaskModel, data: TaskData, tok, out: Path) -> float | None:
    """Write `model` as transformers' class into `out` (config, safetensors, tokenizer); when transformers is
    installed, load it back and return the largest logit difference on the eval examples (RuntimeError above 1e-4)."""
    out.mkdir(parents=True, exist_ok=True)
    sp = special_ids(tok)
    if tok.post_processor is None:  # so transformers' tokenizer frames texts as we trained on them
        tok = Tokenizer.from_str(tok.to_str())
        cls, sep = tok.id_to_token(sp.cls), tok.id_to_token(sp.sep)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1", special_tokens=[(cls, sp.cls), (sep, sp.sep)])
    atomic_write_text(out / "config.json", json.dumps(hf_task_config(model, data.names, sp.as_dict()), indent=2))
    write_weights(out / "model.safetensors", to_hf_task_state_dict(model))
    save_tokenizer(tok, out)
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    tcfg["model_max_length"] = int(model.cfg.max_positions)
    atomic_write_text(out / "tokenizer_config.json", json.dumps(tcfg, indent=2) + "\n")
    (out / "special_ids.json").unlink(missing_ok=True)  # ours, not transformers'
    try:
        import transformers  # optional and heavy (seconds to import): only when a model is written
    except ImportError:
        return None
    return check_with_transformers(model, data, out, transformers)


def check_with_transformers(model: TaskModel, data: TaskData, out: Path, transformers) -> float:
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
    ids, mask, types = collate(enc, index, 0)
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
    return {k: summarize([r[split][k] for r in runs]) for k in keys}


def _prediction_lines(data: TaskData, pred: list) -> str:
    ex = data.examples["test"]
    lines = []
    for i, p in enumerate(pred):
        rec = {"index": i, "prediction": p}
        if ex.labels is not None:
            rec["label"] = ex.labels[i]
        lines.append(json.dumps(rec))
    return "".join(line + "\n" for line in lines)


def _check_tokenizer(net, tok, model_path) -> None:
    """A MODEL must bring its own tokenizer, and that tokenizer's ids must all be rows of the model's embeddings."""
    if tok is None:
        raise UserError(f"{model_path} has no tokenizer.json; fine-tuning needs the tokenizer the model was trained with")
    if tok.get_vocab_size() > net.vocab_size:
        raise UserError(f"{model_path}: the tokenizer has {tok.get_vocab_size()} tokens but the model has "
                        f"{net.vocab_size} vocabulary rows; they do not belong together")


def finetune(model, train, eval, out, task: str = "classify", test=None, text_field=None, pair_field=None,
             label_field=None, seeds: int = 1, probe: bool = False, overrides=(), overwrite: bool = False,
             device: str | None = None) -> dict:
    """`maskedlm finetune`: returns (and the CLI prints) {task, metric, eval, test, seeds, best_step, ...}; writes
    DIR/metrics.jsonl, DIR/predictions.jsonl (with --test) and DIR/best/ (not with --probe). Nothing is written
    when an input is refused. Under torchrun every rank trains on its share of each batch and rank 0 writes."""
    fcfg = load_finetune_config(overrides)
    if not 1 <= int(seeds) <= MAX_SEEDS:  # each seed is a whole fine-tuning run; published medians use 5 to 20
        raise UserError(f"--seeds must be in [1, {MAX_SEEDS}], got {seeds}")
    if fcfg.seed + int(seeds) > SEED_LIMIT:
        raise UserError(f"finetune.seed + --seeds must stay below 2^63, got {fcfg.seed} + {seeds}")
    # --out never over, inside or around an input; --overwrite replaces only an earlier finetune's output
    inputs = [x for x in (model, train, eval, test) if isinstance(x, (str, os.PathLike))]
    out = check_out(out, inputs=inputs, overwrite=overwrite, ours=is_finetune_dir, what="a finetune output")
    net, cfg, tok = load_any_model(model, mlm_head=False)  # the encoder is what is fine-tuned; a fine-tuned one too
    _check_tokenizer(net, tok, model)
    max_len = min(fcfg.max_len, int(net.cfg.max_positions))
    data = load_task(tok, special_ids(tok), task, {"train": train, "eval": eval, "test": test}, text_field, pair_field,
                     label_field, max_len, warn=lambda m: print(m, file=sys.stderr))
    own_group = not dist.in_process_group()  # a group the caller set up is left to the caller
    info = dist.init(device or "auto") if own_group else dist.info()
    try:
        if dist.shard_list(data.examples["train"].labels) is None:  # some rank would have no example to train on
            raise UserError(f"--train has {len(data.examples['train'].labels)} examples, fewer than the "
                            f"{info.world_size} processes; run on fewer processes")
        records: list[dict] = []
        runs, pred, best_model, lr = _train_or_probe(net.to(info.device), data, fcfg, int(seeds), probe, info.device,
                                                     records.append)
        check = dist.everywhere(_write_out, out, inputs, overwrite, records, data, pred, best_model, tok, main_only=True)
    finally:
        if own_group:
            dist.shutdown()
    return {**_summary(runs, data, probe, out, best_model, check), **lr}


def _train_or_probe(net, data: TaskData, fcfg: FinetuneConfig, seeds: int, probe: bool, device, log):
    """(runs, test predictions or None, the best seed's model or None for --probe, {lr, lr_sweep})."""
    if not probe:
        return _fine_tune_seeds(net, data, fcfg, seeds, device, log)
    if seeds > 1:  # the probe has no random part: features are fixed, L-BFGS starts from zeros
        dist.print0("note: --seeds does not apply to --probe (it is deterministic); one run", file=sys.stderr)
    result = run_probe(net, data, fcfg.eval_batch_rows, device, log=log)
    return [result], result.pop("test_predictions", None), None, {"lr": None, "lr_sweep": None}


def _summary(runs: list[dict], data: TaskData, probe: bool, out: Path, best_model, check) -> dict:
    """The command's result: medians over seeds (and the full statistics), the best seed, where DIR/best/ is."""
    main = data.task.main_metric(runs[0]["eval"])
    best = max(runs, key=lambda r: r["eval"][main])
    stats = {"eval": _stats(runs, "eval"), "test": _stats(runs, "test")}
    return {"task": data.task.name, "metric": main, "probe": bool(probe),
            "eval": {k: v["median"] for k, v in stats["eval"].items()},
            "test": {k: v["median"] for k, v in stats["test"].items()} or None,
            "stats": stats, "seeds": [{k: r.get(k) for k in ("seed", "best_step", "eval", "test")} for r in runs],
            "best_step": best.get("best_step"), "best_seed": best.get("seed"), "labels": data.names,
            "out": str(out), "best": str(out / "best") if best_model is not None else None,
            "max_abs_diff_transformers": check}


def _write_out(out: Path, inputs, overwrite: bool, records, data, pred, best_model, tok) -> float | None:
    """DIR as a whole (marker, metrics.jsonl, predictions.jsonl, best/), built beside it and renamed into place;
    returns best/'s largest logit difference from transformers (None when not checked)."""
    check = None
    with building(out, "finetune") as tmp:
        atomic_write_text(tmp / FINETUNE_MARKER, "written by maskedlm finetune; --overwrite may replace this directory\n")
        if best_model is not None:
            check = save_hf(best_model, data, tok, tmp / "best")
        atomic_write_text(tmp / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        if pred is not None:
            atomic_write_text(tmp / "predictions.jsonl", _prediction_lines(data, pred))
        check_out(out, inputs=inputs, overwrite=overwrite, ours=is_finetune_dir, what="a finetune output")  # again: --out may have changed while training
        replace_dir(tmp, out)
    return check


def sweep(net, data: TaskData, fcfg: FinetuneConfig, dev, log) -> tuple[float, list[dict], dict]:
    """finetune.lr=auto: the first seed at every rate of finetune.lr_grid, each for the whole budget; the rate whose
    run scores best on --eval wins (a tie goes to the rate listed first). Returns (rate, the grid's points, the
    winner's run, which becomes the first of the seeds: the sweep costs len(lr_grid) - 1 runs more than --seeds)."""
    points, best = [], None
    for lr in fcfg.lr_grid:
        t0 = time.perf_counter()
        r = train_seed(net, data, replace(fcfg, lr=lr), fcfg.seed, dev, lambda rec, lr=lr: log({"lr": lr, **rec}),
                       label=f"lr {lr:g} seed {fcfg.seed}")
        main = data.task.main_metric(r["eval"])
        points.append({"lr": lr, "eval": r["eval"], "best_step": r["best_step"], "wall_s": time.perf_counter() - t0})
        if best is None or r["eval"][main] > best[1]["eval"][main]:
            best = (lr, r)
    return best[0], points, best[1]


def _seed_runs(net, data, fcfg, seeds: int, dev, log) -> tuple[FinetuneConfig, list[dict], dict | None]:
    """(the config at the rate used, each seed's run, the sweep's record or None when finetune.lr is a number)."""
    if fcfg.lr != "auto":
        return fcfg, [train_seed(net, data, fcfg, fcfg.seed + k, dev, log) for k in range(seeds)], None
    t0, n = time.perf_counter(), len(fcfg.lr_grid)
    cost = (n + seeds - 1) / seeds
    dist.print0(f"finetune.lr=auto: {n} rates ({', '.join(f'{x:g}' for x in fcfg.lr_grid)}) x seed {fcfg.seed}, then "
                f"{seeds - 1} more seed(s) at the best: {n + seeds - 1} runs, {cost:.2g}x the cost of --seeds {seeds} "
                "at a given finetune.lr", file=sys.stderr)
    lr, points, first = sweep(net, data, fcfg, dev, log)
    record = {"picked": lr, "grid": points, "runs": n + seeds - 1, "cost_vs_fixed_lr": cost,
              "sweep_s": time.perf_counter() - t0}
    dist.print0(f"finetune.lr=auto: picked {lr:g} in {record['sweep_s']:.0f} s; eval " + ", ".join(
        f"{p['lr']:g}: {p['eval'][data.task.main_metric(p['eval'])]:.4f}" for p in points), file=sys.stderr)
    fcfg = replace(fcfg, lr=lr)
    return fcfg, [first, *(train_seed(net, data, fcfg, fcfg.seed + k, dev, log) for k in range(1, seeds))], record


def _fine_tune_seeds(net, data, fcfg, seeds: int, dev, log):
    """Each seed trained (after the sweep when finetune.lr=auto) and its best state scored on test; returns (runs,
    test predictions, the best seed's model, {lr: the rate used, lr_sweep: the sweep's record or None})."""
    fcfg, runs, record = _seed_runs(net, data, fcfg, seeds, dev, log)
    for r in runs:
        if "test" in data.examples and data.examples["test"].labels is not None:
            model = _model_for(net, data, fcfg, r["state"]).to(dev)
            r["test"], _ = _evaluate(model, data, "test", fcfg, dev)
            log({"seed": r["seed"], "step": r["best_step"], "split": "test", **r["test"]})
    main = data.task.main_metric(runs[0]["eval"])
    best = max(runs, key=lambda r: r["eval"][main])
    model = _model_for(net, data, fcfg, best["state"]).to(dev)
    pred = predict(model, data, "test", fcfg, dev) if "test" in data.examples else None
    for r in runs:
        r.pop("state", None)
    return runs, pred, model, {"lr": fcfg.lr, "lr_sweep": record}
