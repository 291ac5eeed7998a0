"""Rows for one rank, in a deterministic, resumable order: the whole optimizer step at a time.

Each epoch is a permutation of the split's rows drawn from a generator keyed by (seed, epoch); global batch n takes
rows [n·G, (n+1)·G) of its epoch (with a batch warmup, the next plan.rows(n)), split across ranks and then into
micro-batches, cut to the plan's row length. The only state is n, so a run resumes exactly, at any world size.
MixLoader draws each row's source of a mixture by a counter keyed by (seed, step, slot). Masking can run here on a
background thread; the loader knows nothing about models.
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
    source: torch.Tensor | None = None  # (B,) int64 index of each row's source in a mixture; None for one source


@dataclass
class StepBatch:
    position: int  # global batches consumed before this one (== optimizer steps taken so far)
    epoch: int
    micro: list[MicroBatch]
    source_rows: list[int] | None = None  # a mixture's rows drawn per source over all ranks, this step included


def epoch_permutation(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch `epoch`: a pure function of (seed, epoch), whatever ran before."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def cut_rows(ids: torch.Tensor, flags: torch.Tensor, row_index: torch.Tensor, length: int):
    """Prepared rows (B, T) cut into B·T/length exact rows of `length`: each starts with its row's [CLS] and goes on
    with the next length − 1 tokens (and their flags) of the row, so T/length − 1 tokens at the row's end are left
    out. Piece j of row r gets the mask key r·(T/length) + j: distinct for every piece of every row."""
    B, T = ids.shape
    n = T // length
    if n == 1:
        return ids, flags, row_index
    body = slice(1, 1 + n * (length - 1))

    def cut(x):
        head = x[:, :1, None].expand(B, n, 1)  # (B, n, 1) the row's [CLS]
        return torch.cat([head, x[:, body].reshape(B, n, length - 1)], dim=2).reshape(B * n, length)  # (B·n, length)

    keys = (row_index[:, None] * n + torch.arange(n, dtype=row_index.dtype)).reshape(B * n)  # (B·n,)
    return cut(ids), cut(flags), keys


def _check_split(g: int, w: int, m: int) -> None:
    if g % w != 0 or (g // w) % m != 0:
        raise UserError(
            f"train.global_batch_rows ({g}) must be divisible by world size ({w}) × train.micro_batch_rows ({m}); "
            f"e.g. set train.micro_batch_rows to a divisor of {g // w if g % w == 0 else g}"
        )


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
        plan=None,
    ):
        g, w, m = global_batch_rows, world_size, micro_batch_rows
        _check_split(g, w, m)
        if len(store) < g:
            raise UserError(f"the data has {len(store)} rows, fewer than train.global_batch_rows ({g}); lower it or prepare more data")
        self.store, self.global_batch_rows, self.micro_batch_rows = store, g, m
        self.seed, self.rank, self.world_size = seed, rank, w
        self.transform = transform
        self.prefetch_steps = prefetch_steps
        self.steps_per_epoch = len(store) // g
        self.plan = plan  # an optim.BatchPlan: rows and row length per step; None: G rows at the prepared length
        self._ramp = self._walk_ramp() if plan is not None and plan.ramps else None
        self.position = 0
        self._perm: tuple[int, np.ndarray] | None = None
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    # -- order ----------------------------------------------------------------------------------------------------
    def _walk_ramp(self) -> list[tuple[int, int]]:
        """(epoch, first row in it) of every step of a batch warmup's ramp: a step takes the next rows of its epoch,
        or starts the next epoch when they would run past its end (as a full batch does)."""
        n, w = len(self.store), self.world_size
        if any(rows % w for _, _, rows in self.plan.levels):
            raise UserError(f"train.batch_warmup_start_rows ({self.plan.levels[0][2]}) must be divisible by the world size "
                            f"({w}): every step's rows are split evenly across ranks")
        out, epoch, at = [], 0, 0
        for s in range(self.plan.levels[-1][0] + 1):  # the ramp and the first full step
            rows = self.plan.rows(s)
            if at + rows > n:
                epoch, at = epoch + 1, 0
            out.append((epoch, at))
            at += rows
        return out

    def _locate(self, position: int) -> tuple[int, int, int]:
        """(epoch, first row in the epoch's order, rows) of global batch `position`."""
        g = self.global_batch_rows
        if self._ramp is None:
            epoch, k = divmod(position, self.steps_per_epoch)
            return epoch, k * g, g
        first = len(self._ramp) - 1  # the first full-batch step
        if position < first:
            return (*self._ramp[position], self.plan.rows(position))
        epoch, at = self._ramp[first]
        k = position - first
        in_first = (len(self.store) - at) // g  # full steps still in that epoch
        if k < in_first:
            return epoch, at + k * g, g
        e, j = divmod(k - in_first, self.steps_per_epoch)
        return epoch + 1 + e, j * g, g

    def _rows_of(self, position: int) -> tuple[int, np.ndarray]:
        epoch, at, g = self._locate(position)
        if self._perm is None or self._perm[0] != epoch:  # one permutation cached; the prefetch thread moves ahead
            self._perm = (epoch, epoch_permutation(len(self.store), self.seed, epoch))
        rows = self._perm[1][at:at + g]
        share = g // self.world_size
        return epoch, rows[self.rank * share:(self.rank + 1) * share]

    def _cut(self, mb: MicroBatch, position: int) -> MicroBatch:
        """A micro-batch cut to the plan's row length at `position` (sequence-length phases); as it is otherwise."""
        length = self.plan.row_len(position) if self.plan is not None else mb.ids.shape[1]
        if length == mb.ids.shape[1]:
            return mb
        mb.ids, mb.flags, mb.row_index = cut_rows(mb.ids, mb.flags, mb.row_index, length)
        if mb.source is not None:
            mb.source = mb.source.repeat_interleave(mb.ids.shape[0] // len(mb.source))
        return mb

    def _build(self, position: int) -> StepBatch:
        epoch, rows = self._rows_of(position)
        micro = []
        for i in range(0, len(rows), self.micro_batch_rows):
            idx = np.ascontiguousarray(rows[i:i + self.micro_batch_rows], dtype=np.int64)
            ids, flags = self.store.rows(idx)
            mb = self._cut(MicroBatch(
                ids=torch.from_numpy(np.asarray(ids, dtype=np.int64)),
                flags=torch.from_numpy(np.asarray(flags, dtype=np.uint8)),
                row_index=torch.from_numpy(idx),
                epoch=epoch,
            ), position)
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
        return self._locate(self.position)[0]

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


# The Weyl sequence of the golden ratio in 64-bit fixed point: u_j = (φ + j·GOLDEN) mod 2^64 is the most evenly
# spread sequence of its kind, so any window of L slots holds each source's share of them to within a few slots.
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# A mixture row's mask key: (source << SOURCE_SHIFT) + epoch · rows + row, unique for every (source, epoch, row).
SOURCE_SHIFT = 48


def _splitmix(x: int) -> np.uint64:
    z = (x + 0x9E3779B97F4A7C15) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return np.uint64(z ^ (z >> 31))


def mixture_sources(seed: int, step: int, slots: int, weights) -> np.ndarray:
    """The source (index into weights) of each slot of global batch `step`: a pure function of (seed, step, slot).

    Slot j = step·slots + slot of the whole run takes the source whose interval of [0, 1), of length its weight,
    holds the Weyl sequence's point u_j. Over any window of a few hundred steps the shares are the weights to within
    a fraction of a percent, with no state, so every rank and every resume draws the same sources."""
    w = np.asarray(weights, dtype=np.float64)
    bounds = np.floor(np.cumsum(w / w.sum())[:-1] * 2.0**64).astype(np.float64)
    j = np.uint64(step) * np.uint64(slots) + np.arange(slots, dtype=np.uint64)
    with np.errstate(over="ignore"):
        u = _splitmix(seed) + j * GOLDEN
    return np.searchsorted(bounds, u.astype(np.float64), side="right").astype(np.int64)


class MixLoader(RowLoader):
    """A RowLoader over a weighted mixture of sources (one RowStore each, same row length).

    Each slot of a global batch takes its source from `mixture_sources`, and the k-th row a source gives is row k of
    that source's own sequence of epochs (each a permutation keyed by (seed + source, epoch)): a source that runs out
    starts its next epoch on its own. The state is the position and the rows drawn per source, so a resume continues
    the same rows; every rank computes the whole global batch's plan and takes its share, as RowLoader does.
    """

    def __init__(self, stores, weights, global_batch_rows: int, micro_batch_rows: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, transform=None, prefetch_steps: int = 0, plan=None):
        g, w, m = global_batch_rows, world_size, micro_batch_rows
        _check_split(g, w, m)
        if plan is not None and plan.ramps:
            raise UserError("train.batch_warmup_tokens is not supported with a mixture of --data sources; set it to 0")
        self.plan, self._ramp = plan, None
        if len(weights) != len(stores) or not all(x > 0 for x in weights):
            raise UserError(f"a mixture needs one weight > 0 per source: {len(stores)} sources, weights {list(weights)}")
        for i, st in enumerate(stores):
            if len(st) == 0:
                raise UserError(f"source {i} of the mixture has no rows")
        self.stores, self.weights = list(stores), [float(x) for x in weights]
        self.store = self.stores[0]
        self.global_batch_rows, self.micro_batch_rows = g, m
        self.seed, self.rank, self.world_size = seed, rank, w
        self.transform, self.prefetch_steps = transform, prefetch_steps
        self.steps_per_epoch = max(1, sum(len(st) for st in self.stores) // g)  # of the sources together
        self.position = 0
        self.consumed = np.zeros(len(self.stores), np.int64)  # rows drawn per source before `position`
        self._cursor = (0, self.consumed.copy())  # where the (possibly prefetching) builder stands
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self._thread, self._queue, self._stop = None, None, threading.Event()

    def _perm(self, s: int, epoch: int) -> np.ndarray:
        if (s, epoch) not in self._perms:
            if len(self._perms) > 2 * len(self.stores):  # keep the permutations of the current epochs only
                self._perms.clear()
            self._perms[(s, epoch)] = epoch_permutation(len(self.stores[s]), self.seed + s, epoch)
        return self._perms[(s, epoch)]

    def _plan(self, position: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source, k: how many rows that source gave before, per global slot; rows per source after the step)."""
        pos, counts = self._cursor
        if position < pos:  # not on the sequential path (never in training): replay from the start
            pos, counts = 0, np.zeros(len(self.stores), np.int64)
        while True:
            src = mixture_sources(self.seed, pos, self.global_batch_rows, self.weights)
            k = np.empty_like(src)
            after = counts.copy()
            for s in range(len(self.stores)):
                sel = src == s
                k[sel] = counts[s] + np.arange(int(sel.sum()))
                after[s] += int(sel.sum())
            if pos == position:
                self._cursor = (pos + 1, after)
                return src, k, after
            pos, counts = pos + 1, after

    def _build(self, position: int) -> StepBatch:
        src, k, after = self._plan(position)
        share = self.global_batch_rows // self.world_size
        src, k = src[self.rank * share:(self.rank + 1) * share], k[self.rank * share:(self.rank + 1) * share]
        lens = np.array([len(st) for st in self.stores], np.int64)
        epoch, i = k // lens[src], k % lens[src]
        row = np.array([self._perm(int(s), int(e))[j] for s, e, j in zip(src, epoch, i)], np.int64)
        key = (src << SOURCE_SHIFT) + epoch * lens[src] + row
        micro = []
        for a in range(0, share, self.micro_batch_rows):
            sl = slice(a, a + self.micro_batch_rows)
            ids = np.empty((len(src[sl]), self.stores[0].seq_len), np.int64)
            flags = np.empty(ids.shape, np.uint8)
            for s in np.unique(src[sl]):
                sel = np.flatnonzero(src[sl] == s)
                ids[sel], flags[sel] = self.stores[s].rows(row[sl][sel])
            # epoch 0 for the masks: the key already holds each row's own source and epoch
            mb = self._cut(MicroBatch(ids=torch.from_numpy(ids), flags=torch.from_numpy(flags),
                                      row_index=torch.from_numpy(np.ascontiguousarray(key[sl])), epoch=0,
                                      source=torch.from_numpy(np.ascontiguousarray(src[sl]))), position)
            if self.transform is not None:
                mb.masked = self.transform(mb, position)
            micro.append(mb)
        return StepBatch(position=position, epoch=self._epoch_of(after), micro=micro, source_rows=after.tolist())

    def _epoch_of(self, counts) -> int:
        """Whole passes over every source: the smallest number of epochs any source has finished."""
        return int(min(c // len(st) for c, st in zip(counts, self.stores)))

    def next_step(self) -> StepBatch:
        batch = super().next_step()
        self.consumed = np.asarray(batch.source_rows, np.int64)
        return batch

    def _start(self) -> None:
        self._cursor = (self.position, self.consumed.copy())
        super()._start()

    @property
    def epoch(self) -> int:
        return self._epoch_of(self.consumed)

    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": self.epoch, "seed": self.seed,
                "global_batch_rows": self.global_batch_rows, "rows": [len(st) for st in self.stores],
                "weights": self.weights, "source_rows": self.consumed.tolist()}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "global_batch_rows", "rows", "weights"):
            if state.get(key) != mine[key]:
                raise UserError(
                    f"cannot resume the data order: the checkpoint's loader {key} is {state.get(key)}, this run's is "
                    f"{mine[key]} (same data, weights and config needed)"
                )
        self.close()
        self.position = int(state["position"])
        self.consumed = np.asarray(state["source_rows"], np.int64)
        self._cursor = (self.position, self.consumed.copy())
