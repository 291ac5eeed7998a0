"""The loss-spike guard: notices a step whose loss jumps far above the recent median and rolls the run back.

A rollback restores the last checkpoint's weights, optimizer, counters and RNG into the Trainer and leaves its loader
where it is, so the data window that led to the spike is skipped, not replayed. Nothing here decides when to save.
"""

from __future__ import annotations

import collections

import torch

from maskedlm import distributed as dist
from maskedlm.checkpoint import load_for_resume, set_rng_state
from maskedlm.errors import UserError

MAX_ROLLBACKS = 3  # rollbacks in a row to the same checkpoint before the run stops: then the spikes are not the data's


class SpikeGuard:
    """train.spike_guard_nats (0: off) over a window of train.spike_window_steps losses. Every rank sees the same
    all-reduced loss, so every rank decides alike."""

    def __init__(self, nats: float, window_steps: int):
        self.nats = nats
        self.window = collections.deque(maxlen=window_steps)
        self.spike: dict | None = None  # a spike seen, waiting for the loop to roll back
        self.in_row = 0  # rollbacks since the last checkpoint was saved

    def watch(self, rec: dict, bad: bool) -> None:
        """Note a step's loss; mark `rec` and hold the spike when it exceeds the window's median by `nats` (the
        window must be full before the guard arms)."""
        if not self.nats or bad or self.spike is not None:
            return
        full = len(self.window) == self.window.maxlen
        median = float(torch.tensor(list(self.window)).median()) if full else None
        if median is not None and rec["loss"] > median + self.nats:
            self.spike = {"step": rec["step"], "loss": rec["loss"], "median": median}
            rec["spike"] = True
        else:
            self.window.append(rec["loss"])

    def rollback(self, trainer) -> None:
        """Back to the trainer's last checkpoint, its loader left where it is. Logged as a "rollback" record; the
        abandoned steps' records are dropped from metrics.jsonl, so steps stay unique."""
        spike, self.spike = self.spike, None
        trainer._pending.clear()  # steps queued after the spike go with it
        rec = {"kind": "rollback", **spike, "threshold_nats": self.nats, "data_position": trainer.loader.position}
        ck = load_for_resume(trainer.out, warn=dist.print0)
        if ck is None:  # a spike before the first checkpoint: nothing to go back to
            trainer.logger.log({**rec, "to_step": None})
            trainer.logger.write(f"loss spike at step {spike['step']} ({spike['loss']:.3f} nats vs median "
                                 f"{spike['median']:.3f}); no checkpoint yet to roll back to")
            return
        self.in_row += 1
        if self.in_row > MAX_ROLLBACKS:
            raise UserError(f"{MAX_ROLLBACKS} loss spikes in a row after rolling back to step {ck.state['step']} (last at "
                            f"step {spike['step']}: {spike['loss']:.3f} nats vs median {spike['median']:.3f}); lower "
                            "optim.lr, or raise train.spike_guard_nats, then --resume")
        dist.load_model_state(trainer.model, ck.model_state)
        dist.load_optimizer_state(trainer.model, trainer.optimizer, ck.optimizer_state)
        mine = dist.own_entry(ck.state.get("rng_ranks") or [])
        if mine is not None:
            set_rng_state(mine)
        trainer.step = int(ck.state["step"])
        trainer.skipped, trainer.bad_in_row = int(ck.state.get("skipped_steps", 0)), int(ck.state.get("bad_steps_in_row", 0))
        self.window.clear()
        trainer.logger.truncate(trainer.step)
        trainer.logger.log({**rec, "to_step": trainer.step})
        trainer.logger.write(f"loss spike at step {spike['step']} ({spike['loss']:.3f} nats vs median {spike['median']:.3f}): "
                             f"rolled back to step {trainer.step}, skipping the data read since")
