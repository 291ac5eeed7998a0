"""`--config auto` (train.auto_shape): a model shape, batch and learning rate for the run's budget on this machine.

A time budget is turned into tokens with each candidate's step rate, measured here for a few seconds; then the rule
picks the largest candidate that the budget gives at least TOKENS_PER_PARAM tokens per non-embedding parameter, and
trains it with the short-budget recipe below (Muon, 32 rows per step, lr 4e-3, warmup-stable-decay). The rule and the
runs behind it are in docs/design.md, "A shape for the budget".
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

from maskedlm import distributed as dist
from maskedlm.errors import UserError

# Candidate shapes of the modern family (ModernBERT's GeGLU width 1.5 × hidden, 64-wide heads), smallest first.
# H128/L4, H192/L4 and H256/L4 (modern-mini) were measured against each other (bench/RESULTS.md "Quality per
# compute"); the two larger ones are there for faster machines and longer budgets, where the rule, not a
# measurement, picks them.
CANDIDATES = ((128, 4), (192, 4), (256, 4), (384, 6), (512, 8))  # (hidden, layers)
# The least tokens per non-embedding parameter a budget must give a shape before the rule prefers it to a smaller
# one. H192 beat H256 at equal time where H256 got 0.34 to 3.24 tokens per parameter (AdamW: the demo at 1, 2 and 10
# idle minutes' worth of tokens, and 1.32 in 5 real idle minutes at 2 threads: 3.872 against 3.961 nats), and with
# Muon H128 beat H192 where H192 got 1.5 and 3.8 (2 and 5 idle minutes of tokens: 3.995 against 4.18, 3.606 against
# 3.654): the threshold must be above those. 4 is the least round value that agrees; nothing above was measured.
TOKENS_PER_PARAM = 4.0
# The optimizer, rows per step and LR: Muon (AdamW for embeddings and norms) at 32 rows and lr 4e-3 beat AdamW at 16
# rows and lr 1e-3 (the best AdamW recipe: 16 rows beat 32 and 8, 1e-3 beat 7e-4 and 2e-3) by 0.14 nats in 5 real
# idle minutes at 2 threads, and Muon at 16 rows by 0.08: its Newton-Schulz step costs the same at any batch, so 32
# rows pay it half as often per token (bench/RESULTS.md "Quality per compute", phase 7).
OPTIMIZER = "muon"
ROWS = 32
LR = 4e-3  # Muon at H192, 16 rows, 2 minutes of tokens: 4e-3 beat 1e-3 (+0.37), 2e-3 (+0.10) and 8e-3 (+0.11)
WARMUP_STEPS = 30  # the demo's short-budget warmup, with the warmup-stable-decay schedule
CALIBRATE_SECONDS = 3.0  # per candidate; at least MIN_TIMED steps after one untimed step
MIN_TIMED = 2
# The keys the rule sets; an override of any of them next to auto_shape would be silently replaced, so it is refused.
AUTO_KEYS = ("model.hidden", "model.heads", "model.intermediate", "model.layers", "train.global_batch_rows",
             "train.micro_batch_rows", "optim.name", "optim.lr", "optim.warmup_steps", "optim.schedule")


@dataclass
class Shape:
    hidden: int
    layers: int

    @property
    def heads(self) -> int:
        return self.hidden // 64

    @property
    def intermediate(self) -> int:
        return self.hidden * 3 // 2

    def params(self) -> int:
        """Non-embedding parameters of a modern block stack: q, k, v, out (4 C²) and GeGLU (C × 2I in, I × C out)."""
        return self.layers * (4 * self.hidden ** 2 + 3 * self.hidden * self.intermediate)

    def name(self) -> str:
        return f"H{self.hidden}/L{self.layers}"


def pick(shapes: list[Shape], tokens: dict[str, float]) -> tuple[Shape, str]:
    """The rule: the largest shape (by parameters) whose budget in tokens gives >= TOKENS_PER_PARAM tokens per
    non-embedding parameter; the smallest when none does. Returns the shape and why."""
    ordered = sorted(shapes, key=Shape.params)
    ratios = {s.name(): tokens[s.name()] / s.params() for s in ordered if s.name() in tokens}
    fits = [s for s in ordered if ratios.get(s.name(), 0.0) >= TOKENS_PER_PARAM]
    chosen = fits[-1] if fits else ordered[0]
    why = ("the largest candidate with >= {:g} tokens per non-embedding parameter".format(TOKENS_PER_PARAM) if fits
           else f"no candidate reaches {TOKENS_PER_PARAM:g} tokens per non-embedding parameter: the smallest")
    table = ", ".join(f"{n} {tokens[n]:,.0f} tokens ({r:.2f} per parameter)" for n, r in ratios.items())
    return chosen, f"{table}; chose {chosen.name()}: {why}"


def budget_tokens(cfg, seq_len: int, rate: float | None) -> float:
    """Tokens the run's budget buys at `rate` tokens/s: the first of max_steps, max_tokens, max_minutes to end it."""
    t = cfg.train
    options = [t.max_steps * ROWS * seq_len if t.max_steps else math.inf, t.max_tokens or math.inf]
    if t.max_minutes and rate is not None:
        options.append(t.max_minutes * 60.0 * rate)
    return min(options)


def apply(cfg, shape: Shape) -> None:
    m, t, o = cfg.model, cfg.train, cfg.optim
    m.hidden, m.layers, m.heads, m.intermediate = shape.hidden, shape.layers, shape.heads, shape.intermediate
    t.global_batch_rows = t.micro_batch_rows = ROWS
    o.name, o.lr, o.warmup_steps, o.schedule = OPTIMIZER, LR, WARMUP_STEPS, "wsd"


def _check_can_choose(cfg, preset_cfg, init_from: bool) -> None:
    if init_from:
        raise UserError("train.auto_shape chooses the model's shape, but --init-from fixes it; drop one of them")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("train.auto_shape calibrates in one process; under torchrun pass the shape it chose "
                        "on a single-process run (it prints them) as overrides")
    for key in AUTO_KEYS:
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) != getattr(getattr(preset_cfg, section), name):
            raise UserError(f"train.auto_shape sets {key}; drop that override, or drop auto_shape")


def choose(cfg, preset_cfg, data, measure_rate: Callable, init_from: bool = False) -> str:
    """Set cfg's shape, batch and LR for its budget on this machine (in place); returns the line that says why.
    `measure_rate(cfg, data)` gives tokens/s of real training steps (train.py's, which owns the Trainer)."""
    _check_can_choose(cfg, preset_cfg, init_from)
    if cfg.model.family != "modern":
        raise UserError("train.auto_shape picks among modern shapes; use it with a modern preset (or --config auto)")
    shapes = [Shape(h, n) for h, n in CANDIDATES]
    tokens, rates = {}, {}
    for s in sorted(shapes, key=Shape.params):
        apply(cfg, s)
        rate = measure_rate(cfg, data) if cfg.train.max_minutes else None
        tokens[s.name()] = budget_tokens(cfg, data.seq_len, rate)
        if rate is not None:
            rates[s.name()] = rate
            dist.print0(f"auto shape: {s.name()} trains {rate:,.0f} tokens/s here")
        if tokens[s.name()] / s.params() < TOKENS_PER_PARAM:
            break  # larger shapes run no faster, so none of them can reach the threshold either
    chosen, why = pick(shapes, tokens)
    apply(cfg, chosen)
    cfg.validate()
    source = "measured rates over max_minutes" if rates else "the budget in tokens, no calibration needed"
    return (f"auto shape ({source}): {why}; {ROWS} rows per step, optim {OPTIMIZER}, lr {LR:g}, warmup {WARMUP_STEPS} "
            f"steps, wsd (rule: docs/design.md, 'A shape for the budget')")
