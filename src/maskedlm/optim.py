"""Parameter groups, AdamW (or StableAdamW) and learning-rate schedules.

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
    (foreach) path; or StableAdamW."""
    groups = param_groups(model, cfg)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "stable_adamw":
        return StableAdamW(groups, **kwargs)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # fused unsupported on this device/dtype
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


class Schedule:
    """Warmup (linear from 0 over warmup_steps) then linear | cosine | constant | wsd decay to min_lr_ratio × lr; wsd's
    decay phase falls linearly, as a half cosine or as 1 − sqrt (optim.decay_shape).

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
        else:  # wsd: constant, then a decay over the last decay_fraction of the run (Hu et al. 2024, MiniCPM)
            start = 1.0 - c.decay_fraction
            decay = 1.0 if q <= start or c.decay_fraction == 0 else 1.0 - (1.0 - lo) * _fall(c.decay_shape, (q - start) / c.decay_fraction)
        return warm * decay

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
