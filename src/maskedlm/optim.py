"""Parameter groups, AdamW (or StableAdamW, or Muon with AdamW), learning-rate and batch schedules.

Weight decay applies to weight matrices only: biases, norms and embeddings are left alone unless configured. The LR and
the batch plan (rows and row length per step) are pure functions of the step and the config, so resuming needs only the
step; nothing here touches data, ranks or files.
"""

from __future__ import annotations

import bisect
import math

import torch
from torch import nn

from maskedlm.config import Config, OptimConfig, TrainConfig, seq_len_phases
from maskedlm.errors import UserError


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Two AdamW groups: decayed (matrices) and not decayed (biases, norms, embeddings unless optim.decay_embeddings)."""
    embedding_ids = set()
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            embedding_ids.update(id(p) for p in m.parameters(recurse=False))
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # a tied decoder weight is the embedding itself: one entry
            continue
        seen.add(id(p))
        # Biases and norm gains are vectors: decaying them pulls activations' scale to zero (BERT, RoBERTa exclude them).
        is_embedding = id(p) in embedding_ids
        if p.ndim < 2 or (is_embedding and not cfg.decay_embeddings):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


class StableAdamW(torch.optim.Optimizer):
    """AdamW with per-tensor update clipping (Wortsman et al. 2023, "Stable and low-precision training for large-scale
    vision-language models"; ModernBERT trains with it). Each tensor's LR is divided by max(1, RMS_t), where
    RMS_t = sqrt(mean(g_t² / max(v̂_t, eps²))) compares this step's gradient with the second moment that scales it:
    a gradient far larger than the moment has seen (a spike) takes a proportionally smaller step, and as v̂ catches
    up the step returns to AdamW's. Weight decay is decoupled (AdamW's), at the tensor's clipped LR.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.98), eps: float = 1e-6, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # the names and layout of torch's AdamW state, so checkpoints read alike
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                self._update(p, p.grad, state, lr, beta1, beta2, eps, wd)
        return loss

    @staticmethod
    def _update(p, g, state, lr, beta1, beta2, eps, wd) -> None:
        m, v = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        t = float(state["step"])  # a host tensor (as torch's AdamW keeps it): no device wait
        bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        # One buffer, in place: a CPU step is memory-bound, and each full-size temporary is another pass and another
        # allocation. With v̂ = v / bc2: g² / max(v̂, eps²) = bc2 · g² / max(v, bc2·eps²).
        buf = torch.clamp(v, min=bc2 * eps * eps)
        torch.div(g, buf, out=buf).mul_(g)
        rms = (buf.mean() * bc2).sqrt()  # ()
        # The clipped LR stays a device tensor: reading it on the host would wait for the device once per tensor.
        lr_t = lr / rms.clamp(min=1.0)  # ()
        if wd:
            p.mul_(1.0 - lr_t * wd)
        # lr_t · (m / bc1) / (sqrt(v̂) + eps) = m / ((sqrt(v) + eps·sqrt(bc2)) / lr_t) · sqrt(bc2) / bc1
        torch.sqrt(v, out=buf).add_(eps * math.sqrt(bc2)).div_(lr_t)
        p.addcdiv_(m, buf, value=-math.sqrt(bc2) / bc1)


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device | str = "cpu") -> torch.optim.Optimizer:
    """optim.name: AdamW, fused where the device supports it (one kernel for all tensors), else the multi-tensor
    (foreach) path; StableAdamW; or Muon for the encoder's matrices with AdamW for the rest (MuonAdamW)."""
    if cfg.name == "muon":
        return MuonAdamW(model, cfg)
    groups = param_groups(model, cfg)
    if cfg.name == "stable_adamw":
        return StableAdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    return adamw(groups, cfg)


def adamw(groups: list[dict], cfg: OptimConfig) -> torch.optim.AdamW:
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # fused unsupported on this device/dtype
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


class MuonAdamW:
    """optim.name=muon: Muon for the encoder's matrices (the weights of its nn.Linear layers), AdamW for the rest
    (embeddings, the decoder, norms, biases), under one LR schedule.

    Muon (Jordan et al. 2024; torch.optim.Muon) replaces each matrix's momentum-averaged gradient by its nearest
    semi-orthogonal matrix (five Newton-Schulz iterations) before the step, so every direction of the matrix moves at
    the same rate. With Moonshot's scaling ("Muon is Scalable for LLM Training", Liu et al. 2025: the update's RMS
    matched to AdamW's, `adjust_lr_fn="match_rms_adamw"`) optim.lr and optim.weight_decay mean what they mean for
    AdamW. The embedding (a table read row by row) and the output layer (rows for tokens of very different
    frequencies) take AdamW, as Muon's authors advise. The matrices must be whole on every rank: FSDP2's shards are
    refused.

    Two torch optimizers behind one interface: `param_groups` lists both optimizers' groups, which the schedule sets
    to one LR (a higher LR for the matrices alone did no better: bench/RESULTS.md), and `optimizers` hands both to
    torch's distributed state-dict functions, which key their state by parameter name: one file, resumed exactly.
    """

    def __init__(self, model: nn.Module, cfg: OptimConfig):
        linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
        groups = param_groups(model, cfg)
        matrices = [p for g in groups for p in g["params"] if id(p) in linear and p.ndim == 2]
        # An FSDP2 shard is a DTensor (it has full_tensor); asked here rather than via distributed.is_sharded, because
        # optim.py sits below the ranks layer and imports nothing from it.
        if any(hasattr(p, "full_tensor") for p in matrices):
            raise UserError("optim.name=muon orthogonalises whole matrices and cannot step FSDP2's shards; use "
                            "train.parallel=ddp (or optim.name=adamw)")
        taken = {id(p) for p in matrices}
        rest = [{**g, "params": [p for p in g["params"] if id(p) not in taken]} for g in groups]
        self.muon = torch.optim.Muon(matrices, lr=cfg.lr, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw")
        self.adamw = adamw([g for g in rest if g["params"]], cfg)
        self.optimizers = (self.muon, self.adamw)
        self.defaults: dict = {}  # not fused as a whole: OptimizerStep reads a bad step's flag on the host and skips

    @property
    def param_groups(self) -> list[dict]:
        # read through each time: loading a state dict replaces an optimizer's group dicts with new ones
        return self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)


class Schedule:
    """Warmup (linear from 0 over warmup_steps) then linear | cosine | constant | wsd decay to min_lr_ratio × lr; wsd's
    decay phase falls linearly, as a half cosine or as 1 − sqrt (optim.decay_shape).

    Progress through the run is a fraction in [0, 1]. With a step or token budget it is counted in steps after warmup,
    so decay ends exactly at the last step. With a time budget the caller passes the elapsed fraction of max_minutes
    (the larger of the two when both are set), so decay ends exactly when the time runs out.

    With a batch warmup the schedule's clock is `clock(step)`, the tokens seen in full-batch steps (BatchPlan.clock):
    warmup and decay then count tokens, not the smaller steps of the ramp.
    """

    def __init__(self, cfg: OptimConfig, total_steps: int | None, clock=None):
        self.cfg = cfg
        self.total_steps = total_steps
        self.clock = clock

    def progress(self, step: int, time_fraction: float | None = None) -> float:
        """Fraction of the decay phase done at `step` (0-based count of optimizer steps already taken)."""
        fracs = []
        if self.total_steps:
            span = max(1, self._clock(self.total_steps) - self.cfg.warmup_steps)
            fracs.append((self._clock(step) - self.cfg.warmup_steps) / span)
        if time_fraction is not None:
            fracs.append(time_fraction)
        return min(1.0, max(0.0, max(fracs))) if fracs else 0.0

    def factor(self, step: int, time_fraction: float | None = None) -> float:
        c = self.cfg
        warm = min(1.0, self._clock(step + 1) / c.warmup_steps) if c.warmup_steps > 0 else 1.0
        q = self.progress(step, time_fraction)
        lo = c.min_lr_ratio
        if c.schedule == "constant":
            decay = 1.0
        elif c.schedule == "linear":
            decay = 1.0 - (1.0 - lo) * q
        elif c.schedule == "cosine":
            decay = lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * q))
        else:  # wsd: constant, then a decay over the last decay_fraction of the run (Hu et al. 2024, MiniCPM)
            start = 1.0 - c.decay_fraction
            decay = 1.0 if q <= start or c.decay_fraction == 0 else 1.0 - (1.0 - lo) * _fall(c.decay_shape, (q - start) / c.decay_fraction)
        return warm * decay

    def _clock(self, step: int) -> float:
        return self.clock(step) if self.clock else step

    def lr(self, step: int, time_fraction: float | None = None) -> float:
        return self.cfg.lr * self.factor(step, time_fraction)


def _fall(shape: str, x: float) -> float:
    """How far a decay phase has fallen (0 → 1) at fraction x of it. 1-sqrt is the cooldown Hägele et al. 2024 found
    best for WSD ("Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations"), ModernBERT's final
    decay: it falls fastest at first and leaves the LR low for longer than linear."""
    if shape == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * x))
    return math.sqrt(x) if shape == "1-sqrt" else x


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


class BatchPlan:
    """What optimizer step s trains on: how many prepared rows (the batch warmup), cut to which length (the sequence
    length phases), and the tokens before it; a pure function of train.* and the prepared row length.

    The warmup grows the batch linearly in tokens seen, from batch_warmup_start_rows to global_batch_rows over
    batch_warmup_tokens, in multiples of the start, so every step splits evenly across ranks whatever the world size
    (ModernBERT ramps its batch over its first tokens the same way). A prepared row counts seq_len tokens whatever
    length it is cut to. Off (the default), step s takes global_batch_rows rows and s·G·seq_len tokens came before it.
    """

    def __init__(self, t: TrainConfig, seq_len: int):
        self.G, self.T = t.global_batch_rows, seq_len
        self.phases = seq_len_phases(t.seq_len_phases)
        for n, _ in self.phases:
            if seq_len % n:
                raise UserError(f"train.seq_len_phases: {n} does not divide the prepared seq_len {seq_len} (each row is cut "
                                f"into whole rows of that length); use a divisor of {seq_len}")
        # (first step, rows before it, rows per step) of each level of the ramp; the last level is the full batch
        self.warm_tokens = t.batch_warmup_tokens
        self.levels = self._ramp(t.batch_warmup_tokens, t.batch_warmup_start_rows)
        self._firsts = [lv[0] for lv in self.levels]
        self.total_tokens: int | None = None  # the run's tokens, which phase fractions are of (set by the trainer)

    def _ramp(self, warm_tokens: int, start: int) -> list[tuple[int, int, int]]:
        G, T = self.G, self.T
        if not warm_tokens:
            return [(0, 0, G)]
        levels, s, rows_before = [], 0, 0
        for k in range(1, G // start):
            # k·start rows per step until the tokens seen reach the point where the line start + (G − start)·τ/W
            # crosses (k + 1)·start: τ ≥ k·start·W / (G − start)
            until = -(-k * start * warm_tokens // (G - start))
            n = max(0, -(-(until - rows_before * T) // (k * start * T)))
            if n:
                levels.append((s, rows_before, k * start))
                s, rows_before = s + n, rows_before + n * k * start
        return levels + [(s, rows_before, G)]

    @property
    def ramps(self) -> bool:
        """A batch warmup is on: some steps take fewer rows than a full batch."""
        return len(self.levels) > 1

    def _level(self, step: int) -> tuple[int, int, int]:
        return self.levels[bisect.bisect_right(self._firsts, step) - 1]

    def rows(self, step: int) -> int:
        """Prepared rows in global batch `step`."""
        return self._level(step)[2]

    def rows_before(self, step: int) -> int:
        first, before, rows = self._level(step)
        return before + (step - first) * rows

    def tokens_before(self, step: int) -> int:
        return self.rows_before(step) * self.T

    def clock(self, step: int) -> float:
        """Tokens seen before `step`, in full-batch steps: `step` itself when there is no warmup."""
        return self.rows_before(step) / self.G

    def steps_for_tokens(self, tokens: int) -> int:
        """The fewest steps whose tokens reach `tokens`."""
        first, before, _ = self.levels[-1]
        if before * self.T >= tokens:  # within the ramp
            lo, hi = 0, first
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (mid + 1, hi) if self.tokens_before(mid) < tokens else (lo, mid)
            return lo
        return first + -(-(tokens - before * self.T) // (self.G * self.T))

    def describe(self) -> str:
        """The batch warmup and the phases in words, a line each, for the run's start-up summary ("" when off)."""
        out = ""
        if self.ramps:
            out += (f"batch warmup: {self.levels[0][2]} → {self.G} rows over {self.warm_tokens:,} tokens "
                    f"({self.levels[-1][0]:,} steps); the LR schedule counts tokens\n")
        if self.phases:
            out += "seq_len phases: " + ", then ".join(f"{n} until {f:.0%} ({round(f * self.total_tokens):,} tokens)"
                                                        if f < 1 else str(n) for n, f in self.phases) + "\n"
        return out

    def row_len(self, step: int) -> int:
        """The length the rows of global batch `step` are cut to: its phase's, by the share of the run's tokens seen."""
        if not self.phases:
            return self.T
        seen = self.tokens_before(step) / self.total_tokens
        return next((n for n, until in self.phases if seen < until), self.phases[-1][0])


def run_budget(cfg: Config, plan: BatchPlan) -> tuple[int | None, float | None]:
    """(steps or None, seconds or None) of the run's budget: the first of steps, tokens and minutes that is set."""
    t = cfg.train
    if not (t.max_steps or t.max_tokens or t.max_minutes):
        raise UserError("no training budget: set train.max_steps, train.max_tokens or train.max_minutes (e.g. train.max_minutes=10)")
    steps = [s for s in (t.max_steps, plan.steps_for_tokens(t.max_tokens) if t.max_tokens else 0) if s]
    return (min(steps) if steps else None), (t.max_minutes * 60.0 if t.max_minutes else None)


def batch_plan(cfg: Config, seq_len: int) -> BatchPlan:
    """The run's BatchPlan, its phases measured against the run's tokens (a time budget alone has no such number)."""
    plan = BatchPlan(cfg.train, seq_len)
    steps, _ = run_budget(cfg, plan)
    if plan.phases:
        if steps is None:
            raise UserError(f"train.seq_len_phases ends its phases at fractions of the run's tokens; a time budget alone "
                            f"(train.max_minutes={cfg.train.max_minutes:g}) has none: set train.max_tokens or train.max_steps")
        plan.total_tokens = plan.tokens_before(steps)
    return plan


def fill_rate_schedule_steps(cfg: Config, plan: BatchPlan) -> str | None:
    """A linear/cosine mask-rate schedule with masking.rate_schedule_steps 0 runs over the whole run: fill in the run's
    total steps (train.max_steps, or the steps train.max_tokens makes) before the config is saved or compared, so the
    saved config.json holds the number and a resume follows the same schedule (it is keyed by step). Returns where
    the number came from, for the start-up summary; None when nothing was filled."""
    m, t = cfg.masking, cfg.train
    if m.rate_schedule == "constant" or m.rate_schedule_steps > 0:
        return None
    steps, _ = run_budget(cfg, plan)
    if steps is None:
        raise UserError(
            f"masking.rate_schedule={m.rate_schedule!r} with a time budget alone (train.max_minutes={t.max_minutes:g}) "
            "has no step count to schedule over; set masking.rate_schedule_steps (e.g. the steps you expect in that "
            "time) or give train.max_steps / train.max_tokens"
        )
    m.rate_schedule_steps = int(steps)
    return "train.max_steps" if t.max_steps and steps == t.max_steps else "train.max_tokens"


def rate_text(cfg: Config, schedule_from: str | None) -> str:
    m = cfg.masking
    if m.rate_schedule == "constant":
        return f"rate {m.mask_rate:g}"
    filled = f" (from {schedule_from})" if schedule_from else ""
    return (f"rate {m.rate_schedule} {m.rate_start or m.mask_rate:g} → {m.rate_end or m.mask_rate:g} over "
            f"{m.rate_schedule_steps:,} steps{filled}")
