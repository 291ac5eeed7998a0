"""Rows for one rank, in a deterministic, resumable order: the whole optimizer step at a time.

Each epoch is a permutation of the split's rows drawn from a generator keyed by (seed, epoch); global batch n takes
rows [n·G, (n+1)·G) of its epoch, split across ranks and then into micro-batches. The only state is n, so a run resumes
exactly, at any world size. Masking can run here on a background thread; the loader knows nothing about models.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from maskedlm.errors import UserError


@dataclass
class MicroBatch:
    ids: torch.Tensor  # (B, T) int64 token ids x
    flags: torch.Tensor  # (B, T) uint8, bit 0 document start, bit 1 word start
    row_index: torch.Tensor  # (B,) int64 index of each row in the split: the key of its mask
    epoch: int
    masked: Any = None  # what the transform made of it (a masking.MaskedBatch in training)


@dataclass
class StepBatch:
    position: int  # global batches consumed before this one (== optimizer steps taken so far)
    epoch: int
    micro: list[MicroBatch]


def epoch_permutation(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch `epoch`: a pure function of (seed, epoch), whatever ran before."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


class RowLoader:
    """Yields StepBatch objects: this rank's share of one global batch, already split into micro-batches.

    The caller gets a whole step at once, so the global count of A(x) in the step is known before the first backward.
    A trailing part of an epoch smaller than a global batch is skipped (the next epoch reshuffles, so no row is lost
    for good).
    """

    def __init__(
        self,
        store,
        global_batch_rows: int,
        micro_batch_rows: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        transform: Callable[[MicroBatch, int], Any] | None = None,
        prefetch_steps: int = 0,
    ):
        g, w, m = global_batch_rows, world_size, micro_batch_rows
        if g % w != 0 or (g // w) % m != 0:
            raise UserError(
                f"train.global_batch_rows ({g}) must be divisible by world size ({w}) × train.micro_batch_rows ({m}); "
                f"e.g. set train.micro_batch_rows to a divisor of {g // w if g % w == 0 else g}"
            )
        if len(store) < g:
            raise UserError(f"the data has {len(store)} rows, fewer than train.global_batch_rows ({g}); lower it or prepare more data")
        self.store, self.global_batch_rows, self.micro_batch_rows = store, g, m
        self.seed, self.rank, self.world_size = seed, rank, w
        self.transform = transform
        self.prefetch_steps = prefetch_steps
        self.steps_per_epoch = len(store) // g
        self.position = 0
        self._perm: tuple[int, np.ndarray] | None = None
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    # -- order ----------------------------------------------------------------------------------------------------
    def _rows_of(self, position: int) -> tuple[int, np.ndarray]:
        epoch, k = divmod(position, self.steps_per_epoch)
        if self._perm is None or self._perm[0] != epoch:  # one permutation cached; the prefetch thread moves ahead
            self._perm = (epoch, epoch_permutation(len(self.store), self.seed, epoch))
        g = self.global_batch_rows
        rows = self._perm[1][k * g:(k + 1) * g]
        share = g // self.world_size
        return epoch, rows[self.rank * share:(self.rank + 1) * share]

    def _build(self, position: int) -> StepBatch:
        epoch, rows = self._rows_of(position)
        micro = []
        for i in range(0, len(rows), self.micro_batch_rows):
            idx = np.ascontiguousarray(rows[i:i + self.micro_batch_rows], dtype=np.int64)
            ids, flags = self.store.rows(idx)
            mb = MicroBatch(
                ids=torch.from_numpy(np.asarray(ids, dtype=np.int64)),
                flags=torch.from_numpy(np.asarray(flags, dtype=np.uint8)),
                row_index=torch.from_numpy(idx),
                epoch=epoch,
            )
            if self.transform is not None:
                mb.masked = self.transform(mb, position)
            micro.append(mb)
        return StepBatch(position=position, epoch=epoch, micro=micro)

    # -- iteration ------------------------------------------------------------------------------------------------
    def next_step(self) -> StepBatch:
        if self.prefetch_steps <= 0:
            batch = self._build(self.position)
        else:
            if self._thread is None:
                self._start()
            item = self._queue.get()
            if isinstance(item, BaseException):
                self.close()
                raise item
            batch = item
            assert batch.position == self.position, (batch.position, self.position)
        self.position += 1
        return batch

    def __iter__(self):
        while True:
            yield self.next_step()

    def _start(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.prefetch_steps)
        start = self.position

        def work():
            pos = start
            try:
                while not self._stop.is_set():
                    batch = self._build(pos)
                    while not self._stop.is_set():
                        try:
                            self._queue.put(batch, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    pos += 1
            except BaseException as e:  # handed to the consumer, raised there
                self._queue.put(e)

        self._thread = threading.Thread(target=work, name="maskedlm-loader", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._thread, self._queue = None, None

    # -- resume ---------------------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.position // self.steps_per_epoch

    def state_dict(self) -> dict:
        """Position counts global batches, so it means the same at any world size or micro-batch size."""
        return {
            "position": self.position,
            "epoch": self.epoch,
            "seed": self.seed,
            "global_batch_rows": self.global_batch_rows,
            "rows": len(self.store),
        }

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("global_batch_rows", self.global_batch_rows), ("rows", len(self.store))):
            if state.get(key) != mine:
                raise UserError(
                    f"cannot resume the data order: the checkpoint's loader {key} is {state.get(key)}, this run's is {mine} "
                    "(same data and config needed)"
                )
        self.close()
        self.position = int(state["position"])
