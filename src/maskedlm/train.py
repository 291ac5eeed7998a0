"""The training loop: masks, sparse forward, Σ −log p / global |A(x)|, accumulate, clip, step, schedule, log, save.

`Trainer` holds one run: construction does the set-up, `train_step(batch)` is one whole optimizer step (the one that
bench/throughput.py times), `fit()` is the loop, `state_dict()` / `load_state_dict()` carry what a resume needs.
`train()` is the public entry: it resolves the config, data and run dir, resumes, and calls `fit()`. One code path
for one CPU and N torchrun processes: only distributed.py knows about ranks.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from maskedlm import autoshape, objective
from maskedlm import distributed as dist
from maskedlm.checkpoint import Checkpoint, load_for_resume, remove_stale_tmp, rng_state, save_checkpoint, set_rng_state
from maskedlm.config import RESUME_FREE_KEYS, RESUME_NOTED_KEYS, Config, check_resume_config, config_diff, config_hash, load_config, read_config_json
from maskedlm.data.loader import MixLoader, RowLoader, StepBatch
from maskedlm.data.shards import FLAG_DOC_START, DataDir, mixture_weights, open_sources
from maskedlm.errors import UserError
from maskedlm.evaluate import evaluate, weighted_metrics
from maskedlm.files import atomic_write_text, check_out, lock_dir
from maskedlm.masking import config_k_max, mask_batch
from maskedlm.metrics import Budget, MetricsLogger, NullLogger, truncate_jsonl
from maskedlm.model import MaskedLM, plan_model
from maskedlm.models import check_compatible, holds_run, is_run_dir, load_any_model
from maskedlm.optim import Schedule, batch_plan, build_optimizer, fill_rate_schedule_steps, rate_text, run_budget
from maskedlm.probe import load_probe_tasks, probe_record
from maskedlm.process import StopFlag, reuse_host_memory
from maskedlm.spikes import SpikeGuard
from maskedlm.step import OptimizerStep

# The preset a run gets without --config: in every short run measured (docs/runs.md) modern-mini learns to use the
# context within ~150 steps, while bert-mini stays on the unigram plateau far longer.
DEFAULT_PRESET = "modern-mini"
HOST_READ_LAG = None  # steps between queuing a step and reading its numbers on the host; None: 1 on CUDA, 0 else
PREFETCH_STEPS = 2  # steps read and masked ahead; two hide the data path behind a step without holding much memory


# ------------------------------------------------------------------------------------------------ run set-up
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def _resolve_config(config, overrides, out: Path, resume: bool, data: DataDir, init_cfg) -> tuple[Config, Config | None]:
    """The run's Config (model.vocab_size filled from the data) and, when resuming, the stored one."""
    stored = None
    if resume and (out / "config.json").is_file():
        stored = read_config_json(out / "config.json")
    base = config if config is not None else (stored if stored is not None else DEFAULT_PRESET)
    if stored is not None and config == "auto":  # resuming: the shape chosen when the run started
        base = stored
    cfg = load_config(base, overrides)
    if init_cfg is not None:  # --init-from: the architecture is the checkpoint's
        cfg.model = init_cfg
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = data.vocab_size
    if cfg.train.auto_shape and stored is None:  # a resume keeps the shape chosen when the run started
        dist.print0(autoshape.choose(cfg, load_config(base), data, measure_rate, init_from=init_cfg is not None))
    return cfg.validate(), stored


def _fmt(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def _checkpoint_to_resume(out: Path, cfg: Config, data: DataDir) -> Checkpoint | None:
    """The newest usable checkpoint of the run in `out`, checked against this config and data; None: start at 0."""
    dist.on_main(remove_stale_tmp, out / "checkpoints")  # a save that a kill interrupted
    ck = load_for_resume(out, warn=dist.print0)
    if ck is None:
        dist.print0(f"note: {out} has no checkpoint yet; starting the run from step 0")
        return None
    differ = config_diff(load_config(ck.config), cfg, ignore=RESUME_FREE_KEYS | RESUME_NOTED_KEYS)
    if differ:
        raise UserError(f"checkpoint {ck.path} was written by a different config ({', '.join(differ)} differ); "
                        "resume with the same config or start a new --out")
    was = ck.state.get("data", {}).get("tokenizer_hash")
    if was and data.tokenizer_hash and was != data.tokenizer_hash:
        raise UserError(f"{data.path} was prepared with a different tokenizer than the run in {out} was trained on; "
                        "resume with the run's data")
    return ck


# ------------------------------------------------------------------------------------------------ the trainer
@dataclass
class StepResult:
    """One optimizer step's numbers, left on the device until `Trainer.read` (reading them waits for the step)."""

    step: int  # optimizer steps taken, this one included
    lr: float
    epoch: int
    count: torch.Tensor  # () float64: the global |A(x)| of the step, the loss's normaliser
    sums: torch.Tensor  # (2,) float32: Σ −log p and correct top-1 predictions over the step, all ranks
    grad_norm: torch.Tensor  # (): before clipping
    bad: torch.Tensor  # () bool: the update was skipped (non-finite loss or gradient, or nothing selected)
    source_rows: list[int] | None = None  # a mixture's rows drawn per source so far, all ranks


class Trainer:
    """One training run. Construction does the set-up; `train_step` is one optimizer step; `fit` is the loop.

    model: the MaskedLM to train, its weights already loaded (a resume or --init-from loads them before wrapping).
    data: the prepared data dir to train on; None builds only what `train_step` needs (bench/throughput.py and the
    step tests feed their own batches). out: the run dir to log and save into; None logs and saves nothing.
    logger: None opens the run dir's (rank 0). lock: the run dir's lock, for train() to release. resume: the
    checkpoint to continue from (its counters, loader position, RNG and optimizer state; the weights are in `model`).
    """

    def __init__(self, cfg: Config, model: MaskedLM, data: DataDir | None = None, out: Path | None = None, *,
                 device: torch.device | None = None, logger=None, sources: list[DataDir] | None = None,
                 probe_tasks: list | None = None, lock=None, resume: Checkpoint | None = None):
        self.cfg, self.data, self.out = cfg, data, (Path(out) if out is not None else None)
        # A mixture's sources, `data` first (it stands for all: they share tokenizer and row length).
        self.sources = list(sources) if sources else ([data] if data is not None else [])
        t = cfg.train
        self.device = device if device is not None else dist.info().device
        self.model = model.to(self.device)
        self.num_parameters = model.num_parameters()  # before sharding
        self.sync_model = dist.wrap_model(model, t.parallel)
        self.optimizer = build_optimizer(model, cfg.optim, self.device)  # after wrapping: FSDP2 replaces parameters
        self.forward = torch.compile(self.sync_model) if t.compile else self.sync_model
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if t.precision == "bf16" else nullcontext()
        # Host reads of device values (loss, norm, counts, stop flags) make the host wait for the device. On CUDA
        # they are read one step late, so the host queues step s+1 while step s runs; on CPU nothing runs
        # asynchronously and they are read at once (lag 0, the same code).
        self.lag = HOST_READ_LAG if HOST_READ_LAG is not None else (1 if self.device.type == "cuda" else 0)

        self.seq_len = data.seq_len if data is not None else None
        self.tokens_per_step = t.global_batch_rows * (self.seq_len or 0)  # of a full step (after any batch warmup)
        self.plan = batch_plan(cfg, data.seq_len) if data is not None else None
        self.max_steps, self.max_seconds = run_budget(cfg, self.plan) if data is not None else (None, None)
        self.schedule = Schedule(cfg.optim, self.max_steps, clock=self.plan.clock if self.plan and self.plan.ramps else None)
        self.stepper = OptimizerStep(self.sync_model, self.optimizer, self.schedule,
                                     [p for p in model.parameters() if p.requires_grad], cfg.optim.clip_grad_norm, self.device)
        self.loader = self._build_loader() if data is not None else None
        self.val_store = self._open_val() if data is not None else None
        self.lock = lock  # the run dir's files.lock_dir lock: rank 0 of train() holds it, train() releases it
        self._probe_tasks = probe_tasks  # eval.probe_tasks as load_probe_tasks reads them; None: at the first evaluation

        self.step = 0  # optimizer steps taken
        self.skipped = 0  # steps whose update was skipped, over the whole run
        self.bad_in_row = 0
        self.elapsed_before = 0.0  # seconds of training before this process (a resumed run continues its clock)
        self.guard = SpikeGuard(t.spike_guard_nats, t.spike_window_steps)
        self.last_saved: int | None = None  # the step of the newest checkpoint (resuming a finished run saves nothing)
        self.last_eval: dict | None = None
        self._t0 = time.perf_counter()
        self._window = (time.perf_counter(), 0)  # (start, tokens) of the throughput window
        self._last_record: dict = {"step": 0}
        self._pending: list[StepResult] = []  # steps queued on the device whose numbers the host has not read yet
        self._agree = dist.LaggedMax(self.lag)
        if resume is not None:
            self.load_state_dict(resume.state, resume.optimizer_state)
        self.logger = logger if logger is not None else self._open_logger()

    # -- set-up ---------------------------------------------------------------------------------------------------
    def _open_logger(self):
        """metrics.jsonl and the progress bar of the run dir on rank 0 (a resumed bar starts where the run is); a
        logger that does nothing on other ranks and without a run dir."""
        if self.out is None:
            return NullLogger()
        done = self._done(self.step, self.elapsed_before)
        return dist.on_main(MetricsLogger, self.out, self.budget(), start=done, wait=False) or NullLogger()

    def _build_loader(self) -> RowLoader:
        cfg, data, t = self.cfg, self.data, self.cfg.train
        # One K per row length (one for the whole run without train.seq_len_phases): static shapes for torch.compile.
        k_max = {n: config_k_max(cfg.masking, n) for n in {data.seq_len, *(n for n, _ in self.plan.phases)}}
        counts = None
        if cfg.masking.random_token_dist == "unigram":
            # a mixture draws random tokens by the frequencies of all its sources together (one tokenizer, one vocab)
            counts = sum(torch.from_numpy(d.token_counts("masking.random_token_dist='unigram'")).long() for d in self.sources)

        def make_masks(mb, position):
            # Masks are keyed by (masking.seed, epoch, row index): the same whatever the batch split or world size.
            return mask_batch(mb.ids, mb.row_index, mb.epoch, cfg.masking, data.special, data.vocab_size, flags=mb.flags,
                              step=position, k_max=k_max[mb.ids.shape[1]], token_counts=counts)

        info = dist.info()
        prefetch = PREFETCH_STEPS if t.prefetch else 0
        if len(self.sources) > 1 or cfg.data.weights:
            return MixLoader([d.open("train") for d in self.sources], self.mixture_weights(), t.global_batch_rows,
                             t.micro_batch_rows, seed=t.seed, rank=info.rank, world_size=info.world_size,
                             transform=make_masks, prefetch_steps=prefetch, plan=self.plan)
        return RowLoader(data.open("train"), t.global_batch_rows, t.micro_batch_rows, seed=t.seed, rank=info.rank,
                         world_size=info.world_size, transform=make_masks, prefetch_steps=prefetch, plan=self.plan)

    def mixture_weights(self) -> list[float]:
        return mixture_weights(self.cfg.data.weights, self.sources)

    def _open_val(self):
        if self.cfg.eval.every_steps <= 0:
            return None
        if len(self.sources) > 1:  # a mixture: each source's val split, evaluated apart (see evaluate)
            stores = [d.open("val") if d.rows("val") else None for d in self.sources]
            if not any(stores):
                dist.print0("note: no --data source has validation rows; periodic evaluation is off")
            return stores if any(stores) else None
        if self.data.rows("val") == 0:
            dist.print0(f"note: {self.data.path} has no validation rows; periodic evaluation is off (prepare with --val-fraction > 0)")
            return None
        return self.data.open("val")

    # -- one optimizer step ---------------------------------------------------------------------------------------
    def train_step(self, batch: StepBatch, time_fraction: float | None = None) -> StepResult:
        """One optimizer step over this rank's share of a global batch (its micro-batches already masked): Σ −log p
        over A(x) in the whole step / the global count of A(x), clipped, skipped when not finite (OptimizerStep).
        Nothing here waits for the device; `read` does."""
        count = sum(int(mb.masked.num_selected) for mb in batch.micro)
        lr, count, sums, grad_norm, bad = self.stepper(batch.micro, count, self._masked_sums, self.step, time_fraction)
        self.step += 1
        return StepResult(step=self.step, lr=lr, epoch=batch.epoch, count=count, sums=sums, grad_norm=grad_norm, bad=bad,
                          source_rows=batch.source_rows)

    def _masked_sums(self, mb) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ −log p at A(x) of one micro-batch, and its correct top-1 predictions (the forward under autocast)."""
        m, device = mb.masked, self.device
        targets = m.targets.to(device, non_blocking=True)  # (B, K)
        doc_starts = ((mb.flags & FLAG_DOC_START) != 0).to(device) if self.cfg.model.doc_attention else None
        with self.autocast:
            logits = self.forward(m.input_ids.to(device, non_blocking=True),
                                  positions=m.positions.to(device, non_blocking=True), doc_starts=doc_starts)  # (B, K, V)
        nll = objective.masked_cross_entropy(logits, targets, reduction="sum")  # ()
        return nll, objective.masked_accuracy_counts(logits.detach(), targets)[0]

    def read(self, r: StepResult) -> dict:
        """A step's numbers on the host (waits for that step): counts skipped steps, logs the record, returns it."""
        sums, norm, bad, count = r.sums.tolist(), float(r.grad_norm), bool(r.bad), float(r.count)
        self.skipped += bad
        self.bad_in_row = self.bad_in_row + 1 if bad else 0
        start, tokens = self._window
        tokens += self.tokens_at(r.step) - self.tokens_at(r.step - 1)
        now = time.perf_counter()
        tok_s = tokens / max(now - start, 1e-9)
        rec = {"step": r.step, "tokens": self.tokens_at(r.step), "loss": sums[0] / max(count, 1.0),
               "masked_acc": sums[1] / max(count, 1.0), "lr": r.lr, "grad_norm": norm, "tokens_per_s": tok_s,
               "epoch": r.epoch, "elapsed_s": self.elapsed()}
        if bad:
            rec["skipped"] = True
        if r.source_rows is not None:  # cumulative tokens per source, in --data order
            rec["source_tokens"] = [n * self.seq_len for n in r.source_rows]
        if self.plan is not None and (self.plan.ramps or self.plan.phases):
            rec.update(batch_rows=self.plan.rows(r.step - 1), row_len=self.plan.row_len(r.step - 1))
        self.guard.watch(rec, bad)
        self.logger.log(rec)
        self._last_record = rec
        self.logger.progress(self._done(r.step, rec["elapsed_s"]), rec["loss"], rec["lr"], tok_s)
        if r.step % self.cfg.train.log_every_steps == 0:
            if not self.logger.bar_visible:
                dist.print0(f"step {r.step}: loss {rec['loss']:.4f}, masked_acc {rec['masked_acc']:.3f}, "
                            f"lr {rec['lr']:.2e}, grad_norm {norm:.3f}, {tok_s:,.0f} tok/s")
            start, tokens = now, 0
        self._window = (start, tokens)
        return rec

    def tokens_at(self, step: int) -> int:
        """Tokens trained on in the first `step` steps (a prepared row counts seq_len tokens whatever it is cut to)."""
        return self.plan.tokens_before(step) if self.plan is not None else step * self.tokens_per_step

    def budget(self) -> Budget:
        """The budget that ends the run, in its own unit: minutes when only time is set, tokens when train.max_tokens
        is the step budget that binds, else steps. The progress bar counts in it."""
        t = self.cfg.train
        if self.max_steps is None:
            return Budget("min", t.max_minutes if self.max_seconds else None)
        if t.max_tokens and self.max_steps == self.plan.steps_for_tokens(t.max_tokens):
            return Budget("tok", self.tokens_at(self.max_steps))
        return Budget("step", self.max_steps)

    def _done(self, step: int, elapsed_s: float) -> float:
        unit = self.budget().unit
        if unit == "min":  # the last step ends a little past the budget; the bar stops at 100%
            return min(elapsed_s / 60.0, self.cfg.train.max_minutes)
        return self.tokens_at(step) if unit == "tok" else step

    def _read_pending(self, keep: int = 0) -> None:
        """Read all but the newest `keep` queued steps; stop the run after train.max_bad_steps bad steps in a row."""
        while len(self._pending) > keep:
            rec = self.read(self._pending.pop(0))
            if self.bad_in_row >= self.cfg.train.max_bad_steps:
                bad_run = self.bad_in_row
                while self._pending:  # the state saved below must count every step taken
                    self.read(self._pending.pop(0))
                path = self.save("non-finite loss")
                raise UserError(
                    f"{bad_run} steps in a row had a non-finite loss or gradient (last at step {rec['step']}); stopped, "
                    f"checkpoint {path}. Lower optim.lr, or try train.precision=fp32, then --resume"
                )

    # -- evaluation and checkpoints -------------------------------------------------------------------------------
    def evaluate(self) -> dict | None:
        """The masked loss on the validation split at the fixed evaluation mask (every rank takes part); None
        without validation rows."""
        if self.val_store is None:
            return None
        d = self.data
        if isinstance(self.val_store, list):
            r = self._evaluate_sources()
        else:
            r = evaluate(self.model, self.val_store, self.cfg.eval, d.special, d.vocab_size, device=self.device,
                         precision=self.cfg.train.precision)
        probes = {}
        if self.cfg.eval.probe_tasks:  # downstream quality beside the masked loss; the tasks are read once
            if self._probe_tasks is None:
                self._probe_tasks = load_probe_tasks(self.cfg, d)
            probes = probe_record(self.model, self._probe_tasks, self.device)
        self.logger.log({"kind": "eval", "step": self.step, "tokens": self.tokens_at(self.step),
                         "elapsed_s": self.elapsed(), **{f"val_{k}": v for k, v in r.items()}, **probes})
        shown = "".join(f", {k} {v:.4f}" for k, v in probes.items() if k.endswith(("/accuracy", "/spearman", "_f1")))
        self.logger.write(f"eval step {self.step}: loss {r['loss']:.4f}, accuracy {r['accuracy']:.4f}, "
                          f"perplexity {r['perplexity']:.2f}{shown}")
        self.last_eval = r
        return r

    def _evaluate_sources(self) -> dict:
        """A mixture's evaluation: each source's val split apart (`sources`, None where a source has none), and
        their total weighted by the mixture's weights (over the sources that have val rows)."""
        d, w = self.data, self.mixture_weights()
        per = [evaluate(self.model, st, self.cfg.eval, d.special, d.vocab_size, device=self.device,
                        precision=self.cfg.train.precision) if st is not None else None for st in self.val_store]
        return weighted_metrics(w, per)

    def maybe_evaluate(self) -> None:
        every = self.cfg.eval.every_steps
        if every and self.step % every == 0:
            self._read_pending()
            if self.guard.spike is None:  # a spike's weights are about to be rolled back: nothing to evaluate
                self.evaluate()

    def maybe_save(self) -> None:
        every = self.cfg.checkpoint.every_steps
        if every and self.step % every == 0:
            self._read_pending()
            if self.guard.spike is None:  # never save a spike's weights: they would become the checkpoint to go back to
                self.save("periodic")

    def elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self._t0)

    def state_dict(self, reason: str = "") -> dict:
        """What a resume needs besides weights and optimizer: counters, loader position, every rank's RNG state.
        A collective: every rank calls it."""
        state = {"step": self.step, "tokens": self.tokens_at(self.step), "config_hash": config_hash(self.cfg),
                 "elapsed_s": self.elapsed(), "skipped_steps": self.skipped, "bad_steps_in_row": self.bad_in_row,
                 "rng_ranks": dist.all_gather_object(rng_state()), "reason": reason}
        if self.loader is not None:
            state.update(epoch=self.loader.epoch, loader=self.loader.state_dict())
        if self.data is not None:
            state["data"] = {"dir": str(self.data.path), "tokenizer_hash": self.data.tokenizer_hash,
                             "train_rows": self.data.rows("train"), "dirs": [str(x.path) for x in self.sources]}
        return state

    def load_state_dict(self, state: dict, optimizer_state: dict | None = None) -> None:
        """The inverse of state_dict (plus the optimizer's tensors); the weights are loaded before construction."""
        if optimizer_state is not None:
            dist.load_optimizer_state(self.model, self.optimizer, optimizer_state)
        if self.loader is not None and "loader" in state:
            self.loader.load_state_dict(state["loader"])
        mine = dist.own_entry(state.get("rng_ranks") or [])
        if mine is not None:
            set_rng_state(mine)  # the same world size: each rank's dropout stream continues
        self.step = self.last_saved = int(state["step"])
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.skipped = int(state.get("skipped_steps", 0))
        self.bad_in_row = int(state.get("bad_steps_in_row", 0))

    def save(self, reason: str = "") -> Path | None:
        """A checkpoint of the current step in the run dir (every rank calls it: gathering state is collective)."""
        state = self.state_dict(reason)
        model_state, optim_state = dist.full_state_dicts(self.model, self.optimizer)
        path = dist.on_main(save_checkpoint, self.out, self.step, model_state, optim_state, self.cfg.to_dict(),
                            self.data.tokenizer_file, state, keep=self.cfg.checkpoint.keep)
        self.last_saved = self.step
        self.guard.in_row = 0
        return path

    # -- the loop -------------------------------------------------------------------------------------------------
    def _should_stop(self, stop: StopFlag) -> tuple[str | None, float | None]:
        """(why the loop must stop or None, the elapsed fraction of a time budget). Every rank must agree (time and
        signals differ per process), so the flags are max-reduced and read `lag` steps late like other numbers."""
        time_fraction = min(1.0, self.elapsed() / self.max_seconds) if self.max_seconds else 0.0
        signalled, time_fraction = self._agree([float(stop.reason is not None), time_fraction])
        if signalled > 0:
            return stop.reason or "signal", None
        if (self.max_steps is not None and self.step >= self.max_steps) or (self.max_seconds and time_fraction >= 1.0):
            return "budget", None
        return None, (time_fraction if self.max_seconds else None)

    def fit(self) -> dict:
        """Train until the budget is spent or a signal arrives; evaluate and save as configured; returns the final
        numbers (the last step's record, the last evaluation, the checkpoint)."""
        if self.loader is None or self.out is None:
            raise UserError("Trainer.fit needs a data dir and a run dir")
        stop = StopFlag()
        stop.install()
        self._t0 = time.perf_counter()
        self._window = (time.perf_counter(), 0)
        self._last_record = {"step": self.step}
        interrupted = None
        try:
            while True:
                why, time_fraction = self._should_stop(stop)
                if why is not None:
                    self._read_pending()
                    if self.guard.spike is not None:
                        self.guard.rollback(self)
                        if why == "budget":
                            continue
                    interrupted = None if why == "budget" else why
                    break
                self._pending.append(self.train_step(self.loader.next_step(), time_fraction))
                self._read_pending(keep=self.lag)
                self.maybe_evaluate()
                self.maybe_save()
                if self.guard.spike is not None:
                    self.guard.rollback(self)
            every = self.cfg.eval.every_steps
            if interrupted is None and every and self.step > 0 and (self.last_eval is None or self.step % every):
                self.evaluate()
            if self.last_saved != self.step:
                path = self.save("interrupted by " + interrupted if interrupted else "end")
            else:
                path = self.out / "checkpoints" / f"step_{self.step:07d}"
            if interrupted:
                dist.print0(f"interrupted ({interrupted}) at step {self.step}; checkpoint {path}; continue with --resume")
        finally:
            stop.restore()
            self.loader.close()
            self.logger.close()
        result = {**self._last_record, "step": self.step, "tokens": self.tokens_at(self.step),
                  "skipped_steps": self.skipped, "elapsed_s": self.elapsed(), "checkpoint": str(path),
                  "interrupted": interrupted}
        if self.last_eval is not None:
            result["eval"] = self.last_eval
        dist.print0(f"done: step {self.step}, {_fmt(self.tokens_at(self.step))} tokens, "
                    f"{result['elapsed_s']:.1f} s; checkpoint {path}")
        return result

    def summary(self, schedule_from: str | None) -> str:
        """What the run derived, printed once at start."""
        cfg, t, d, n = self.cfg, self.cfg.train, self.data, self.num_parameters
        world = dist.info().world_size
        budget = []
        if self.max_steps:
            budget.append(f"{self.max_steps:,} step{'s' if self.max_steps != 1 else ''}")
        if self.max_seconds:
            budget.append(f"{t.max_minutes:g} minutes (LR schedule follows elapsed time)")
        mix = ""
        if isinstance(self.loader, MixLoader):
            mix = "mixture: " + ", ".join(f"{s.path} {w:.3f}" for s, w in zip(self.sources, self.loader.weights)) + "\n"
        return (
            f"model: {cfg.model.family}, θ (encoder) {_fmt(n['theta'])} parameters, ω (head) {_fmt(n['omega'])}\n"
            f"data: {d.path}: train {d.rows('train'):,} rows ({_fmt(d.tokens('train'))} tokens), "
            f"val {d.rows('val'):,} rows; seq_len {d.seq_len}, vocab {d.vocab_size:,}\n{mix}"
            f"step: {self.tokens_per_step:,} tokens ({t.global_batch_rows} rows), "
            f"{t.global_batch_rows // (world * t.micro_batch_rows)} micro-batches of {t.micro_batch_rows} rows × "
            f"{world} rank(s); {self.loader.steps_per_epoch:,} steps per epoch\n{self.plan.describe()}"
            f"budget: {' or '.join(budget)}; device {self.device}, precision {t.precision}, compile {t.compile}\n"
            f"masking: unit {cfg.masking.unit}, {rate_text(cfg, schedule_from)}; "
            f"evaluation: unit {cfg.eval.unit}, rate {cfg.eval.mask_rate:g}, seed {cfg.eval.seed}"
        )


def measure_rate(cfg: Config, data: DataDir) -> float:
    """Tokens/s of real training steps of `cfg` on `data` (weights thrown away), after one untimed step: the step rate
    autoshape.py calibrates its candidate shapes with (before the process group exists, hence the device here)."""
    device = torch.device(cfg.train.device if cfg.train.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    model = MaskedLM(cfg.model)
    model.init_weights(cfg.train.seed)
    trainer = Trainer(cfg, model, data, out=None, device=device)
    try:
        float(trainer.train_step(trainer.loader.next_step()).sums[0])  # start-up: allocation, first kernels
        t0, n = time.perf_counter(), 0
        while n < autoshape.MIN_TIMED or time.perf_counter() - t0 < autoshape.CALIBRATE_SECONDS:
            float(trainer.train_step(trainer.loader.next_step()).sums[0])  # the host waits for the step
            n += 1
        return n * trainer.tokens_per_step / (time.perf_counter() - t0)
    finally:
        trainer.loader.close()


def _record_command(out: Path) -> None:
    """Append the command line that started (or resumed) this run to RUN_DIR/command.txt, for reports."""
    path = out / "command.txt"
    before = path.read_text(errors="replace") if path.is_file() else ""
    atomic_write_text(path, before + shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) + "\n")


def _take_run_dir(out: Path, resume: bool):
    """Rank 0 creates RUN_DIR and locks it (files.lock_dir) for the run's life: one writer per run dir. A refusal is
    raised on every rank (dist.on_main), so under torchrun no rank waits for a rank 0 that has gone."""
    lock = dist.on_main(lock_dir, out)
    if not resume and is_run_dir(out):  # another run took `out` between the first check and the lock
        if lock is not None:
            lock.release()
        raise UserError(f"{out} already holds a run; continue it with --resume, or pass a new --out")
    return lock


def _check_sources(cfg: Config, sources: list[DataDir], init_tok) -> None:
    """Everything about the data that can be refused before anything is written: a weight per source, the model's
    vocabulary, positions and tokenizer, every shard's ids within the vocabulary, token counts where needed."""
    mixture_weights(cfg.data.weights, sources)
    check_compatible(cfg.model, init_tok, sources[0])  # the sources share one tokenizer (open_sources checks)
    for source in sources:
        source.open("train")
        if cfg.masking.random_token_dist == "unigram":
            source.token_counts("masking.random_token_dist='unigram'")


def _start_run(config, data, out, overrides, resume: bool, init_from) -> Trainer:
    """Everything before the first step: the config resolved and checked against the data and any stored run, the
    process group joined, the model built (from --init-from or a checkpoint), the run dir written, the Trainer made."""
    if data is None or out is None:
        raise UserError("train needs --data DATA_DIR and --out RUN_DIR")
    sources, out = open_sources(data), Path(out)  # several --data: a mixture of sources sharing one tokenizer
    data = sources[0]
    # Not an input, and not a folder of the user's: a run writes config.json, metrics.jsonl, command.txt into it
    check_out(out, inputs=[*(s.path for s in sources), init_from], overwrite=True, ours=holds_run, what="a run")
    has_run = is_run_dir(out)
    if has_run and not resume:
        raise UserError(f"{out} already holds a run; continue it with --resume, or pass a new --out")
    init_model = init_cfg = init_tok = None
    if init_from is not None and has_run:
        dist.print0(f"note: --init-from {init_from} is ignored: {out} resumes from its own checkpoint")
    elif init_from is not None:
        init_model, full_cfg, init_tok = load_any_model(init_from, mlm_head=False)  # a head it lacks is trained fresh
        init_cfg = full_cfg.model
    cfg, stored = _resolve_config(config, overrides, out, resume, data, init_cfg)
    schedule_from = fill_rate_schedule_steps(cfg, batch_plan(cfg, data.seq_len))
    note = check_resume_config(stored, cfg, out) if stored is not None else None
    if note:
        dist.print0(note)
    _check_sources(cfg, sources, init_tok)
    # Read now, not at the first evaluation: a missing or bad task file is refused before the run dir is written
    # and before any training time is spent. The Trainer keeps them, so they are still read only once.
    probe_tasks = load_probe_tasks(cfg, data)

    info = dist.init(cfg.train.device, timeout_minutes=cfg.train.dist_timeout_minutes)
    if cfg.train.reuse_host_memory and info.device.type == "cpu":
        reuse_host_memory()
    # Refuse what cannot fit before allocating: the model is built in host memory, and on CPU its gradients and two
    # AdamW moments live there too (on a GPU they do not, and FSDP2 shards them).
    plan_model(cfg.model, copies=4 if info.device.type == "cpu" else 1)
    # θ, ω: a private-generator init, then the global RNG (dropout) seeded for this run; rank 0 of N draws as a
    # single process would, the others differ.
    model = MaskedLM(cfg.model)
    model.init_weights(cfg.train.seed)
    if init_model is not None:
        model.load_state_dict(init_model.state_dict())
        del init_model
    dist.seed_ranks(cfg.train.seed)
    ck = _checkpoint_to_resume(out, cfg, data) if resume and has_run else None
    if ck is not None:
        model.load_state_dict(ck.model_state)  # before wrapping
    elif resume and not has_run:
        dist.print0(f"note: nothing to resume in {out}; starting a new run")

    dist.barrier()  # every rank has checked RUN_DIR (has_run) before rank 0 writes into it
    lock = _take_run_dir(out, resume)
    start = int(ck.state["step"]) if ck is not None else 0
    dist.on_main(atomic_write_text, out / "config.json", json.dumps(cfg.to_dict(), indent=2))
    dist.on_main(_record_command, out)
    dist.on_main(truncate_jsonl, out / "metrics.jsonl", start, warn=lambda m: print(f"maskedlm: warning: {m}", file=sys.stderr))
    trainer = Trainer(cfg, model, data, out, sources=sources, probe_tasks=probe_tasks, lock=lock, resume=ck)
    if ck is not None:
        dist.print0(f"resuming from {ck.path} (step {trainer.step})")
    dist.print0(trainer.summary(schedule_from))
    return trainer


def train(config=None, data=None, out=None, overrides=(), resume: bool = False, init_from=None) -> dict:
    """Train per `config` (preset name, TOML path, Config or dict; modern-mini by default) on DATA_DIR (a list of
    them: a mixture, shares by data.weights) into RUN_DIR;
    returns the final numbers: the last step's record, the last evaluation and the checkpoint."""
    trainer = _start_run(config, data, out, overrides, resume, init_from)
    try:
        result = trainer.fit()
    finally:
        if trainer.lock is not None:  # rank 0 holds the run dir's lock, the other ranks None
            trainer.lock.release()
    dist.shutdown()
    return result
