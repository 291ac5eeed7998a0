"""The training loop: masks, sparse forward, Σ −log p / global |A(x)|, accumulate, clip, step, schedule, log, save.

One code path for one CPU and N torchrun processes (distributed.py hides the difference). A run lives in RUN_DIR
(config.json, metrics.jsonl, checkpoints/); it resumes bit-identically on CPU because the model, optimizer, loader
position and RNG state are saved, masks are counter-based, and the LR is a pure function of the step.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from maskedlm import distributed as dist
from maskedlm.checkpoint import (
    atomic_write_text, load_for_resume, remove_stale_tmp, rng_state, save_checkpoint, set_rng_state,
)
from maskedlm.config import Config, config_diff, config_hash, flat_config, load_config
from maskedlm.errors import UserError
from maskedlm.metrics import MetricsLogger, NullLogger, truncate_jsonl
from maskedlm.optim import Schedule, build_optimizer, set_lr

DEFAULT_PRESET = "bert-mini"
HOST_READ_LAG = None  # steps between queuing a step and reading its numbers on the host; None: 1 on CUDA, 0 else
PREFETCH_STEPS = 2  # steps read and masked ahead; two hide the data path behind a step without holding much memory


class _StopFlag:
    """SIGINT/SIGTERM set a flag the loop checks between steps (so the save happens at a step boundary)."""

    def __init__(self):
        self.reason: str | None = None
        self._old = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. train() called from a worker thread)
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the save
        self.reason = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def _resolve_config(config, overrides, out: Path, resume: bool, meta: dict, init_cfg) -> tuple[Config, Config | None]:
    """The run's Config (model.vocab_size filled from the data) and, when resuming, the stored one."""
    stored = None
    if resume and (out / "config.json").is_file():
        stored = load_config(_read_json(out / "config.json"))
    base = config if config is not None else (stored if stored is not None else DEFAULT_PRESET)
    cfg = load_config(base, overrides)
    if init_cfg is not None:  # --init-from: the architecture is the checkpoint's
        cfg.model = init_cfg
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = int(meta["vocab_size"])
    return cfg.validate(), stored


def _budget(cfg: Config, tokens_per_step: int) -> tuple[int | None, float | None]:
    t = cfg.train
    if not (t.max_steps or t.max_tokens or t.max_minutes):
        raise UserError("no training budget: set train.max_steps, train.max_tokens or train.max_minutes (e.g. train.max_minutes=10)")
    steps = [s for s in (t.max_steps, math.ceil(t.max_tokens / tokens_per_step) if t.max_tokens else 0) if s]
    return (min(steps) if steps else None), (t.max_minutes * 60.0 if t.max_minutes else None)


def _fill_rate_schedule_steps(cfg: Config, tokens_per_step: int) -> str | None:
    """A linear/cosine mask-rate schedule with masking.rate_schedule_steps 0 runs over the whole run: fill in the run's
    total steps (train.max_steps, or the steps train.max_tokens makes) before the config is saved or compared, so the
    saved config.json holds the number and a resume follows the same schedule (it is keyed by step). Returns where
    the number came from, for the start-up summary; None when nothing was filled."""
    m, t = cfg.masking, cfg.train
    if m.rate_schedule == "constant" or m.rate_schedule_steps > 0:
        return None
    steps, _ = _budget(cfg, tokens_per_step)
    if steps is None:
        raise UserError(
            f"masking.rate_schedule={m.rate_schedule!r} with a time budget alone (train.max_minutes={t.max_minutes:g}) "
            "has no step count to schedule over; set masking.rate_schedule_steps (e.g. the steps you expect in that "
            "time) or give train.max_steps / train.max_tokens"
        )
    m.rate_schedule_steps = int(steps)
    return "train.max_steps" if t.max_steps and steps == t.max_steps else "train.max_tokens"


def _rate_text(cfg: Config, schedule_from: str | None) -> str:
    m = cfg.masking
    if m.rate_schedule == "constant":
        return f"rate {m.mask_rate:g}"
    filled = f" (from {schedule_from})" if schedule_from else ""
    return (f"rate {m.rate_schedule} {m.rate_start or m.mask_rate:g} → {m.rate_end or m.mask_rate:g} over "
            f"{m.rate_schedule_steps:,} steps{filled}")


def _fmt(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def reuse_host_memory() -> bool:
    """glibc only: serve every allocation from the heap (no mmap) and never trim it back to the OS.

    A CPU train step frees and re-allocates the same large activation buffers every step; glibc's defaults serve them
    with fresh mmaps, so each step page-faults (and the kernel zeroes) hundreds of MB again: ~100k minor faults and
    ~0.2 s of system time per step at bench/throughput.py's default shape, gone with this setting (bench/RESULTS.md),
    for ~10% more peak memory. Returns False where it does not apply (not glibc).
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from <malloc.h>
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def _load_init(init_from):
    """(MaskedLM, ModelConfig, tokenizer) of a Hugging Face BERT/ModernBERT dir (or a maskedlm run) to start from."""
    from maskedlm.hf import load_hf_model

    model, cfg, tok = load_hf_model(init_from)
    return model, cfg.model, tok


def train(config=None, data=None, out=None, overrides=(), resume: bool = False, init_from=None) -> dict:
    """Train per `config` (preset name, TOML path, Config or dict) on DATA_DIR into RUN_DIR; returns final metrics."""
    from maskedlm.data.loader import RowLoader
    from maskedlm.data.shards import FLAG_DOC_START, load_meta, open_split
    from maskedlm.masking import config_k_max, mask_batch
    from maskedlm.model import MaskedLM
    from maskedlm.objective import masked_accuracy_counts, masked_cross_entropy
    from maskedlm.tokenizer import SpecialIds

    if data is None or out is None:
        raise UserError("train needs --data DATA_DIR and --out RUN_DIR")
    data, out = Path(data), Path(out)
    meta = load_meta(data)
    has_run = (out / "config.json").exists() or (out / "checkpoints").exists()
    if has_run and not resume:
        raise UserError(f"{out} already holds a run; continue it with --resume, or pass a new --out")

    init_model = init_cfg = init_tok = None
    if init_from is not None and has_run:
        print(f"note: --init-from {init_from} is ignored: {out} resumes from its own checkpoint")
    elif init_from is not None:
        init_model, init_cfg, init_tok = _load_init(init_from)
    cfg, stored = _resolve_config(config, overrides, out, resume, meta, init_cfg)
    schedule_from = _fill_rate_schedule_steps(cfg, cfg.train.global_batch_rows * int(meta["seq_len"]))
    if stored is not None:
        diff = config_diff(stored, cfg)
        if diff:
            fs, fc = flat_config(stored), flat_config(cfg)
            shown = ", ".join(f"{k}: {fs.get(k)!r} → {fc.get(k)!r}" for k in diff)
            raise UserError(f"--resume with a different config than the run in {out} ({shown}); resume with the same config or start a new --out")

    # The data must fit the model: vocabulary, positions, tokenizer.
    from maskedlm.evaluate import check_compatible

    check_compatible(cfg.model, init_tok, meta, data)
    special = SpecialIds(**{k: int(v) for k, v in meta["special_ids"].items()})
    vocab_size = int(meta["vocab_size"])
    seq_len = int(meta["seq_len"])

    info = dist.init(cfg.train.device, timeout_minutes=cfg.train.dist_timeout_minutes)
    if cfg.train.reuse_host_memory and info.device.type == "cpu":
        reuse_host_memory()
    device = info.device
    t = cfg.train
    tokens_per_step = t.global_batch_rows * seq_len
    max_steps, max_seconds = _budget(cfg, tokens_per_step)

    train_store = open_split(data, "train")
    val_store = None
    if cfg.eval.every_steps > 0:
        if int(meta["splits"].get("val", {}).get("rows", 0)) > 0:
            val_store = open_split(data, "val")
        else:
            dist.print0(f"note: {data} has no validation rows; periodic evaluation is off (prepare with --val-fraction > 0)")

    # Model θ, ω: a private-generator init, then the global RNG (dropout) seeded for this run.
    model = MaskedLM(cfg.model)
    model.init_weights(t.seed)
    if init_model is not None:
        model.load_state_dict(init_model.state_dict())
        del init_model
    torch.manual_seed(t.seed + info.rank)  # dropout: rank 0 of N draws as a single process would; the others differ
    model.to(device)
    schedule = Schedule(cfg.optim, max_steps)

    k_max = config_k_max(cfg.masking, seq_len)  # one K for the whole run: static shapes for torch.compile
    token_counts = None
    if cfg.masking.random_token_dist == "unigram":
        import numpy as np

        if not (data / "token_counts.npy").is_file():
            raise UserError(f"masking.random_token_dist='unigram' needs {data / 'token_counts.npy'}; prepare the data again")
        token_counts = torch.from_numpy(np.load(data / "token_counts.npy"))

    def make_masks(mb, position):
        # Masks are keyed by (masking.seed, epoch, row index): the same whatever the batch split or world size.
        return mask_batch(mb.ids, mb.row_index, mb.epoch, cfg.masking, special, vocab_size, flags=mb.flags,
                          step=position, k_max=k_max, token_counts=token_counts)

    loader = RowLoader(train_store, t.global_batch_rows, t.micro_batch_rows, seed=t.seed, rank=info.rank,
                       world_size=info.world_size, transform=make_masks, prefetch_steps=PREFETCH_STEPS if t.prefetch else 0)

    # Resume: weights (before wrapping), loader position, RNG, counters; optimizer state once it exists.
    step, elapsed_before, skipped, bad_in_row, resumed_at, optimizer_state = 0, 0.0, 0, 0, None, None
    ck_root = out / "checkpoints"
    if resume and has_run:
        if info.is_main:
            remove_stale_tmp(ck_root)
        dist.barrier()
        ck = load_for_resume(out, warn=dist.print0)
        if ck is None:
            dist.print0(f"note: {out} has no checkpoint yet; starting the run from step 0")
        else:
            differ = config_diff(load_config(ck.config), cfg)
            if differ:
                raise UserError(f"checkpoint {ck.path} was written by a different config ({', '.join(differ)} differ); "
                                "resume with the same config or start a new --out")
            was = ck.state.get("data", {}).get("tokenizer_hash")
            if was and meta.get("tokenizer_hash") and was != meta["tokenizer_hash"]:
                raise UserError(f"{data} was prepared with a different tokenizer than the run in {out} was trained on; "
                                "resume with the run's data")
            model.load_state_dict(ck.model_state)
            optimizer_state = ck.optimizer_state
            loader.load_state_dict(ck.state["loader"])
            per_rank = ck.state.get("rng_ranks") or []
            if len(per_rank) == info.world_size:
                set_rng_state(per_rank[info.rank])  # the same world size: each rank's dropout stream continues
            step = int(ck.state["step"])
            resumed_at = step
            elapsed_before = float(ck.state.get("elapsed_s", 0.0))
            skipped = int(ck.state.get("skipped_steps", 0))
            bad_in_row = int(ck.state.get("bad_steps_in_row", 0))
            dist.print0(f"resuming from {ck.path} (step {step})")
            del ck
    elif resume:
        dist.print0(f"note: nothing to resume in {out}; starting a new run")

    dist.barrier()  # every rank has checked RUN_DIR (has_run) before rank 0 writes into it
    out.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2))
        truncate_jsonl(out / "metrics.jsonl", step)
    logger = MetricsLogger(out, max_steps, start_step=step) if info.is_main else NullLogger()

    n = model.num_parameters()  # before sharding
    train_model = dist.wrap_model(model, t.parallel)
    sync_model = train_model
    optimizer = build_optimizer(model, cfg.optim, device)  # after wrapping: FSDP2 replaces the parameters
    if optimizer_state is not None:
        dist.load_optimizer_state(model, optimizer, optimizer_state)
        del optimizer_state
    if t.compile:
        train_model = torch.compile(train_model)

    # What the run derived, printed once.
    splits = meta["splits"]
    micro_per_step = t.global_batch_rows // (info.world_size * t.micro_batch_rows)
    budget = []
    if max_steps:
        budget.append(f"{max_steps:,} step{'s' if max_steps != 1 else ''}")
    if max_seconds:
        budget.append(f"{t.max_minutes:g} minutes (LR schedule follows elapsed time)")
    dist.print0(
        f"model: {cfg.model.family}, θ (encoder) {_fmt(n['theta'])} parameters, ω (head) {_fmt(n['omega'])}\n"
        f"data: {data}: train {splits['train']['rows']:,} rows ({_fmt(int(splits['train']['tokens']))} tokens), "
        f"val {splits.get('val', {}).get('rows', 0):,} rows; seq_len {seq_len}, vocab {vocab_size:,}\n"
        f"step: {tokens_per_step:,} tokens ({t.global_batch_rows} rows), {micro_per_step} micro-batches of "
        f"{t.micro_batch_rows} rows × {info.world_size} rank(s); {loader.steps_per_epoch:,} steps per epoch\n"
        f"budget: {' or '.join(budget)}; device {device}, precision {t.precision}, compile {t.compile}\n"
        f"masking: unit {cfg.masking.unit}, {_rate_text(cfg, schedule_from)}; "
        f"evaluation: unit {cfg.eval.unit}, rate {cfg.eval.mask_rate:g}, seed {cfg.eval.seed}"
    )

    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if t.precision == "bf16" else nullcontext()
    clip = cfg.optim.clip_grad_norm if cfg.optim.clip_grad_norm > 0 else float("inf")
    params = [p for p in model.parameters() if p.requires_grad]
    tokenizer_json = data / "tokenizer.json" if (data / "tokenizer.json").is_file() else None

    evaluate = None
    if val_store is not None:
        try:
            from maskedlm.evaluate import evaluate
        except ImportError:
            dist.print0("note: maskedlm.evaluate is not available; periodic evaluation is off")

    def elapsed() -> float:
        return elapsed_before + (time.perf_counter() - t0)

    def save(reason: str = "") -> Path | None:
        path = None
        rngs = dist.all_gather_object(rng_state())  # collectives: every rank calls save()
        model_state, optim_state = dist.full_state_dicts(model, optimizer)
        if info.is_main:
            state = {
                "tokens": step * tokens_per_step, "epoch": loader.epoch, "loader": loader.state_dict(),
                "config_hash": config_hash(cfg), "elapsed_s": elapsed(), "skipped_steps": skipped,
                "bad_steps_in_row": bad_in_row, "rng_ranks": rngs, "reason": reason,
                "data": {"dir": str(data), "tokenizer_hash": meta.get("tokenizer_hash"), "train_rows": len(train_store)},
            }
            path = save_checkpoint(out, step, model_state, optim_state, cfg.to_dict(), tokenizer_json, state,
                                   keep=cfg.checkpoint.keep)
        dist.barrier()
        return path

    def run_eval() -> dict | None:
        if evaluate is None:
            return None
        r = evaluate(model, val_store, cfg.eval, special, vocab_size, device=device, precision=t.precision)
        logger.log({"kind": "eval", "step": step, "tokens": step * tokens_per_step, **{f"val_{k}": v for k, v in r.items()}})
        logger.write(f"eval step {step}: loss {r['loss']:.4f}, accuracy {r['accuracy']:.4f}, perplexity {r['perplexity']:.2f}")
        return r

    # Host reads of device values (loss, norm, counts, stop flags) make the host wait for the device. They are read
    # HOST_READ_LAG steps late: on CUDA one, so the host queues step s+1 while step s runs; on CPU nothing runs
    # asynchronously and they are read at once (lag 0, same code). A skipped step is decided on the device: the fused
    # AdamW takes a found_inf tensor and leaves parameters, moments and its step count alone when it is set.
    lag = HOST_READ_LAG if HOST_READ_LAG is not None else (1 if device.type == "cuda" else 0)
    skip_on_device = bool(optimizer.defaults.get("fused")) and not any(
        hasattr(p, "full_tensor") for p in params)  # FSDP2's DTensor parameters: decided on the host instead

    def host_to_device(values: list, dtype: torch.dtype) -> torch.Tensor:
        """A small tensor of host numbers on the device, copied without waiting for the device's queue (a plain
        copy to CUDA synchronises the stream; one from pinned memory with non_blocking does not)."""
        x = torch.tensor(values, dtype=dtype)
        return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)

    pending: list[dict] = []  # steps queued on the device whose numbers the host has not read yet
    flag_queue: list[torch.Tensor] = []

    def read_record(p: dict) -> dict:
        """One step's numbers, read back to the host (waits for that step on the device)."""
        nonlocal skipped, bad_in_row, window_t, window_tokens, last
        stats, norm, bad = p.pop("stats").tolist(), float(p.pop("grad_norm")), bool(p.pop("bad"))
        count = float(p["count"])
        if bad:
            skipped += 1
            bad_in_row += 1
        else:
            bad_in_row = 0
        window_tokens += tokens_per_step
        now = time.perf_counter()
        tok_s = window_tokens / max(now - window_t, 1e-9)
        rec = {"step": p["step"], "tokens": p["step"] * tokens_per_step, "loss": stats[0] / max(count, 1.0),
               "masked_acc": stats[1] / max(count, 1.0), "lr": p["lr"], "grad_norm": norm, "tokens_per_s": tok_s,
               "epoch": p["epoch"]}
        if bad:
            rec["skipped"] = True
        logger.log(rec)
        last = rec
        if rec["step"] % t.log_every_steps == 0:
            logger.progress(t.log_every_steps, rec["loss"], rec["lr"], tok_s)
            if not logger.bar_visible:
                dist.print0(f"step {rec['step']}: loss {rec['loss']:.4f}, masked_acc {rec['masked_acc']:.3f}, "
                            f"lr {rec['lr']:.2e}, grad_norm {norm:.3f}, {tok_s:,.0f} tok/s")
            window_t, window_tokens = now, 0
        return rec

    def read_pending(keep: int = 0) -> None:
        """Read all but the newest `keep` queued steps; stop the run after train.max_bad_steps bad steps in a row."""
        while len(pending) > keep:
            rec = read_record(pending.pop(0))
            if bad_in_row >= t.max_bad_steps:
                bad_run = bad_in_row
                while pending:  # the state saved below must count every step taken
                    read_record(pending.pop(0))
                path = save("non-finite loss")
                raise UserError(
                    f"{bad_run} steps in a row had a non-finite loss or gradient (last at step {rec['step']}); stopped, "
                    f"checkpoint {path}. Lower optim.lr, or try train.precision=fp32, then --resume"
                )

    stop = _StopFlag()
    stop.install()
    t0 = time.perf_counter()
    last = {"step": step}
    last_eval, last_saved = None, resumed_at  # resuming a finished run must not rewrite its checkpoint
    window_t, window_tokens = time.perf_counter(), 0
    interrupted = None
    try:
        while True:
            time_fraction = min(1.0, elapsed() / max_seconds) if max_seconds else 0.0
            flags = [float(stop.reason is not None), time_fraction]
            if info.distributed:
                # Every rank must agree on stopping (time and signals differ per process): one tiny max-reduce,
                # read `lag` steps late like the other numbers (at once while fewer are queued)
                flag_queue.append(dist.all_reduce_max(host_to_device(flags, torch.float32)))
                flags = (flag_queue.pop(0) if len(flag_queue) > lag else flag_queue[-1]).tolist()
            if flags[0] > 0:
                interrupted = stop.reason or "signal"
                break
            if (max_steps is not None and step >= max_steps) or (max_seconds is not None and flags[1] >= 1.0):
                break
            batch = loader.next_step()
            # The normaliser is the global count of A(x) in this step, known before any backward pass (DESIGN 4):
            # on one process a host number; across ranks a device tensor (summed without the host waiting)
            local = sum(int(mb.masked.num_selected) for mb in batch.micro)
            if info.distributed:
                count = dist.all_reduce_sum(host_to_device([local], torch.float64))[0]
                norm_by = count.clamp(min=1.0).float()
            else:
                count = float(local)
                norm_by = max(count, 1.0)
            lr = schedule.lr(step, flags[1] if max_seconds else None)
            set_lr(optimizer, lr)
            nll_sum = torch.zeros((), dtype=torch.float32, device=device)
            correct = torch.zeros((), dtype=torch.float32, device=device)
            for i, mb in enumerate(batch.micro):
                m = mb.masked
                targets = m.targets.to(device, non_blocking=True)
                doc_starts = ((mb.flags & FLAG_DOC_START) != 0).to(device) if cfg.model.doc_attention else None
                with dist.grad_sync(sync_model, sync=i == len(batch.micro) - 1):
                    with autocast:
                        logits = train_model(m.input_ids.to(device, non_blocking=True),
                                             positions=m.positions.to(device, non_blocking=True), doc_starts=doc_starts)
                    nll = masked_cross_entropy(logits, targets, reduction="sum")
                    (nll / norm_by).backward()
                nll_sum += nll.detach().float()
                correct += masked_accuracy_counts(logits.detach(), targets)[0].float()
            stats = dist.all_reduce_sum(torch.stack([nll_sum, correct]))
            grad_norm = dist.clip_grad_norm(params, clip)
            # skip the update on a non-finite loss or gradient, or when no position was selected anywhere
            bad = ~(torch.isfinite(stats[0]) & torch.isfinite(grad_norm))
            bad = bad | (count == 0) if info.distributed else (torch.ones_like(bad) if count == 0 else bad)
            if skip_on_device:
                optimizer.found_inf = bad.float()
                optimizer.step()
            elif not bool(bad):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            pending.append({"step": step, "lr": lr, "epoch": batch.epoch, "count": count, "stats": stats,
                            "grad_norm": grad_norm, "bad": bad})
            read_pending(keep=lag)
            due_eval = cfg.eval.every_steps and step % cfg.eval.every_steps == 0
            due_save = cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0
            if due_eval or due_save:
                read_pending()
            if due_eval:
                last_eval = run_eval()
            if due_save:
                save("periodic")
                last_saved = step
        read_pending()
        if interrupted is None and cfg.eval.every_steps and (last_eval is None or step % cfg.eval.every_steps) and step > 0:
            last_eval = run_eval()
        path = save("interrupted by " + interrupted if interrupted else "end") if last_saved != step else (
            ck_root / f"step_{step:07d}")
        if interrupted:
            dist.print0(f"interrupted ({interrupted}) at step {step}; checkpoint {path}; continue with --resume")
    finally:
        stop.restore()
        loader.close()
        logger.close()
    result = {**last, "step": step, "tokens": step * tokens_per_step, "skipped_steps": skipped,
              "elapsed_s": elapsed(), "checkpoint": str(path), "interrupted": interrupted}
    if last_eval is not None:
        result["eval"] = last_eval
    dist.print0(f"done: step {step}, {_fmt(step * tokens_per_step)} tokens, {result['elapsed_s']:.1f} s; checkpoint {path}")
    dist.shutdown()
    return result
