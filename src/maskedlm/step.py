"""OptimizerStep: one optimizer step over a step's micro-batches, shared by pretraining (train.Trainer) and fine-tuning.

The loss is normalised by the step's global item count, the gradient clipped, a non-finite step skipped. It does not
build batches, schedules or models, and knows ranks only through distributed.py.
"""

from __future__ import annotations

import torch

from maskedlm import distributed as dist
from maskedlm.optim import Schedule, set_lr


class OptimizerStep:
    """The one optimizer step every training in maskedlm takes: pretraining (`Trainer.train_step`) and fine-tuning.

    The caller gives the step's micro-batches, how many items carry a loss on this rank, and a function that returns
    a micro-batch's Σ loss (and one more number to report). The loss is that sum over the whole step, every
    micro-batch and rank, divided by the global count of items, known before any backward pass; so splitting a step
    by accumulation or across ranks changes nothing. The gradient is clipped; a step with a non-finite loss or
    gradient, or with nothing to learn from anywhere, leaves weights and optimizer state untouched. Nothing here waits
    for the device.
    """

    def __init__(self, sync_model, optimizer, schedule: Schedule, params: list, clip_grad_norm: float, device):
        self.sync_model, self.optimizer, self.schedule, self.params, self.device = (
            sync_model, optimizer, schedule, params, device)
        self.clip = clip_grad_norm if clip_grad_norm > 0 else float("inf")
        # A skipped step is decided on the device where the fused AdamW can take it (a found_inf tensor leaves
        # parameters, moments and its step count alone); elsewhere the host reads the flag first.
        self.skip_on_device = bool(optimizer.defaults.get("fused")) and not dist.is_sharded(params)

    def __call__(self, micro: list, count_local: int, loss_sums, step: int, time_fraction: float | None = None):
        """(lr, global count, (2,) sums over all ranks, grad norm, skipped) of the step taken after `step` steps."""
        device = self.device
        count = dist.global_sum([count_local], device)[0]  # () float64, summed over ranks without the host waiting
        norm_by = count.clamp(min=1.0).float()
        lr = self.schedule.lr(step, time_fraction)
        set_lr(self.optimizer, lr)
        total = torch.zeros((), dtype=torch.float32, device=device)
        other = torch.zeros((), dtype=torch.float32, device=device)
        for i, mb in enumerate(micro):
            with dist.grad_sync(self.sync_model, sync=i == len(micro) - 1):  # gradients reduced after the last only
                loss_sum, extra = loss_sums(mb)
                (loss_sum / norm_by).backward()
            total += loss_sum.detach().float()
            other += extra.float()
        sums = dist.all_reduce_sum(torch.stack([total, other]))
        grad_norm = dist.clip_grad_norm(self.params, self.clip)
        bad = ~(torch.isfinite(sums[0]) & torch.isfinite(grad_norm)) | (count == 0)
        if self.skip_on_device:
            self.optimizer.found_inf = bad.float()
            self.optimizer.step()
        elif not bool(bad):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr, count, sums, grad_norm, bad
