"""Parameter groups, AdamW and learning-rate schedules.

Weight decay applies to weight matrices only: biases, norms and embeddings are left alone unless configured. The LR is
a pure function of (step, progress), so resuming needs only the step; nothing here touches data, ranks or files.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from maskedlm.config import OptimConfig


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


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device | str = "cpu") -> torch.optim.AdamW:
    """AdamW, fused where the device supports it (one kernel for all tensors), else the multi-tensor (foreach) path."""
    groups = param_groups(model, cfg)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # fused unsupported on this device/dtype
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


class Schedule:
    """Warmup (linear from 0 over warmup_steps) then linear | cosine | constant | wsd decay to min_lr_ratio × lr.

    Progress through the run is a fraction in [0, 1]. With a step or token budget it is counted in steps after warmup,
    so decay ends exactly at the last step. With a time budget the caller passes the elapsed fraction of max_minutes
    (the larger of the two when both are set), so decay ends exactly when the time runs out.
    """

    def __init__(self, cfg: OptimConfig, total_steps: int | None):
        self.cfg = cfg
        self.total_steps = total_steps

    def progress(self, step: int, time_fraction: float | None = None) -> float:
        """Fraction of the decay phase done at `step` (0-based count of optimizer steps already taken)."""
        fracs = []
        if self.total_steps:
            span = max(1, self.total_steps - self.cfg.warmup_steps)
            fracs.append((step - self.cfg.warmup_steps) / span)
        if time_fraction is not None:
            fracs.append(time_fraction)
        return min(1.0, max(0.0, max(fracs))) if fracs else 0.0

    def factor(self, step: int, time_fraction: float | None = None) -> float:
        c = self.cfg
        warm = min(1.0, (step + 1) / c.warmup_steps) if c.warmup_steps > 0 else 1.0
        q = self.progress(step, time_fraction)
        lo = c.min_lr_ratio
        if c.schedule == "constant":
            decay = 1.0
        elif c.schedule == "linear":
            decay = 1.0 - (1.0 - lo) * q
        elif c.schedule == "cosine":
            decay = lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * q))
        else:  # wsd: constant, then linear decay over the last decay_fraction of the run (Hu et al. 2024, MiniCPM)
            start = 1.0 - c.decay_fraction
            decay = 1.0 if q <= start or c.decay_fraction == 0 else 1.0 - (1.0 - lo) * (q - start) / c.decay_fraction
        return warm * decay

    def lr(self, step: int, time_fraction: float | None = None) -> float:
        return self.cfg.lr * self.factor(step, time_fraction)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
