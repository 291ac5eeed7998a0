"""The MLM objective: Σ_{i∈A(x)} −log p_{θ,ω}(x_i | x̄), taken at the selected positions A(x) only.

Targets carry -100 outside A(x) (and at padded slots of the sparse [B, K] layout); those entries add nothing and get
exactly zero gradient. −log p is computed in fp32 even under bf16 autocast. The caller passes the normaliser, the
global count of A(x) in the optimizer step, so micro-batches and ranks add up to the step's loss without averaging twice.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def masked_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "sum",
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """−log p at A(x). logits (..., V), targets (...) with -100 = not in A(x).

    reduction: "sum" → Σ_{i∈A(x)} −log p (the formula's value); "mean" → that sum / |A(x)| in this call (0 if
    empty); "none" → per-entry −log p, 0 where ignored. normalizer: when given, "sum" and "mean" both return
    sum / normalizer (the global count of A(x) in the optimizer step, so micro-batches and ranks add up exactly),
    and "none" returns each entry / normalizer.
    """
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree")
    in_a = targets != IGNORE_INDEX  # (...)
    # fp32 log-softmax: bf16 logits lose the small probabilities that −log p is all about
    logp = torch.log_softmax(logits.float(), dim=-1)  # (..., V)
    picked = torch.gather(logp, -1, targets.clamp(min=0).long().unsqueeze(-1)).squeeze(-1)  # (...)
    nll = (-picked).masked_fill(~in_a, 0.0)  # (...) zero value and zero gradient outside A(x)
    if reduction == "none":
        return nll if normalizer is None else nll / normalizer  # (...)
    total = nll.sum()  # ()
    if normalizer is not None:
        return total / normalizer  # ()
    if reduction == "mean":
        return total / in_a.sum().clamp(min=1)  # ()
    return total  # ()


@torch.no_grad()
def masked_accuracy_counts(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, count) at A(x): top-1 prediction equals x_i, over entries with targets != -100."""
    in_a = targets != IGNORE_INDEX  # (...)
    # max(dim).indices is argmax (the first maximum on ties) and ~4× faster than argmax on bf16 logits on CPU
    # (32 × 39 × 8000, 1 thread: 8.5 vs 35.6 ms, ~6% of a modern-mini train step)
    correct = (logits.max(dim=-1).indices == targets) & in_a  # (...)
    return correct.sum(), in_a.sum()  # (), ()
