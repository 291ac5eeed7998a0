"""The torchrun environment, process groups, model wrapping and reductions: the only module that knows about ranks.

One process (no torchrun variables) takes the same calls as N processes: every helper here is a no-op or identity
when the world has one rank, so the training loop is one code path: nothing outside this module branches on the
world size or calls torch.distributed.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from maskedlm.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_INFO = DistInfo()


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def init(device: str = "auto", timeout_minutes: float = 10.0) -> DistInfo:
    """Join the process group when torchrun started us (NCCL on CUDA, gloo on CPU) and pick this rank's device."""
    global _INFO
    rank, world, local = env_world()
    if device == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and world > 1:
        device = f"cuda:{local}"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"train.device is {device!r} but no CUDA device is available; use train.device=cpu")
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        # A timeout turns a dead peer into an error on the others instead of a hang forever.
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    _INFO = DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)
    return _INFO


def info() -> DistInfo:
    return _INFO


def is_main() -> bool:
    return _INFO.is_main


def print0(*args, **kwargs) -> None:
    """print on rank 0 only; torchrun's RANK decides also before `init` and after `shutdown`."""
    if _INFO.is_main and env_world()[0] == 0:
        print(*args, **kwargs, flush=True)


def in_process_group() -> bool:
    """Whether a process group is already set up (by torchrun via `init`, or by a caller of ours)."""
    return dist.is_available() and dist.is_initialized()


def on_main(fn, *args, wait: bool = True, **kwargs):
    """`fn(*args, **kwargs)` on rank 0 alone (writing a file every rank would write); its result there, None on the
    other ranks. With wait, every rank waits until rank 0 is done, so what it wrote is there for all, and a
    UserError there (a full disk during a save, say) is raised on every rank instead of leaving them at a barrier."""
    if wait:
        return everywhere(fn, *args, main_only=True, **kwargs)
    return fn(*args, **kwargs) if _INFO.is_main else None


def everywhere(fn, *args, main_only: bool = False, **kwargs):
    """`fn(*args, **kwargs)` on every rank (on rank 0 alone with main_only), then a collective check: a UserError
    on any rank is raised on every rank (the lowest rank's message), so no rank waits at a barrier for a peer that
    failed. Returns fn's result (None on the ranks that did not run it)."""
    result, error = None, None
    if _INFO.is_main or not main_only:
        try:
            result = fn(*args, **kwargs)
        except UserError as e:
            error = str(e)
    errors = [m for m in all_gather_object(error) if m is not None]
    if errors:
        raise UserError(errors[0])
    return result


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor of host numbers on `device`, copied without waiting for the device's queue (a plain copy to
    CUDA synchronises the stream; one from pinned memory with non_blocking does not)."""
    x = torch.tensor(values, dtype=dtype)
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)


def global_sum(values: list, device: torch.device) -> torch.Tensor:
    """Host numbers summed over ranks, as a float64 device tensor (no host wait; the numbers themselves on one
    process). The training step's global count of A(x) is computed here, before any backward pass."""
    return all_reduce_sum(to_device(values, torch.float64, device))


class LaggedMax:
    """Every rank's maximum of a few host numbers (stop flags, the elapsed fraction of a time budget), so that all
    ranks agree on when to stop although signals and clocks differ per process.

    The reduced values are read `lag` calls late, like the training step's other numbers, so the host never waits
    for the device in between (at once while fewer calls are queued). One process has nothing to agree with: the
    values come back as they are.
    """

    def __init__(self, lag: int):
        self.lag = lag
        self._queue: list[torch.Tensor] = []

    def __call__(self, values: list[float]) -> list[float]:
        if not _INFO.distributed:
            return list(values)
        self._queue.append(all_reduce_max(to_device(values, torch.float32, _INFO.device)))
        return (self._queue.pop(0) if len(self._queue) > self.lag else self._queue[-1]).tolist()


def is_sharded(params) -> bool:
    """Whether the parameters are FSDP2 DTensors (each rank holds a shard)."""
    return any(hasattr(p, "full_tensor") for p in params)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; identity on one process."""
    if _INFO.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if _INFO.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_object(obj) -> list:
    """Every rank's value of a small picklable object, in rank order (a one-element list on one process)."""
    if not _INFO.distributed:
        return [obj]
    out = [None] * _INFO.world_size
    dist.all_gather_object(out, obj)
    return out


def shard_items(n_items: int) -> list[int | None]:
    """This rank's share of n_items work items (e.g. evaluation micro-batches): item i goes to rank i % world_size,
    so the shares are disjoint, cover every item once and do not depend on timing. Every rank gets a list of the same
    length, padded with None: a sharded model (FSDP2) gathers its weights collectively in each forward, so every rank
    must run as many forwards as the busiest one (a None is a forward whose result is thrown away). range(n_items)
    on one process."""
    w, r = _INFO.world_size, _INFO.rank
    per_rank = -(-int(n_items) // w)  # ceil
    mine: list[int | None] = list(range(r, int(n_items), w))
    return mine + [None] * (per_rank - len(mine))


def shard_list(items: list) -> list | None:
    """This rank's share of a list: item i goes to rank i % world_size, as in shard_items; the whole list on one
    process. None on every rank when the list is too short to give each rank an item: the same answer everywhere, so
    no rank runs a step that the others skip."""
    if len(items) < _INFO.world_size:
        return None
    return items[_INFO.rank::_INFO.world_size]


def own_entry(per_rank: list):
    """This rank's entry of a list all_gather_object gathered; None when it was gathered at another world size."""
    return per_rank[_INFO.rank] if len(per_rank) == _INFO.world_size else None


def seed_ranks(seed: int) -> None:
    """Seed torch's global RNG (dropout) with seed + rank: rank 0 of N draws as a single process would, the others
    differ."""
    torch.manual_seed(int(seed) + _INFO.rank)


def barrier() -> None:
    if _INFO.distributed:
        dist.barrier()


def _sum_hook(_state, bucket):
    # DDP's default hook averages gradients over ranks; the loss is already divided by the global count of A(x), so
    # the gradient of the global objective is the plain sum (averaging again would divide by the world size twice).
    fut = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def wrap_model(model: torch.nn.Module, parallel: str = "ddp") -> torch.nn.Module:
    """Under torchrun: DDP (replicated weights) or FSDP2 (weights, gradients and optimizer state sharded), both
    reducing gradients by SUM; on one process, the model itself. Load weights before wrapping, build the optimizer
    after (FSDP2 replaces parameters with sharded DTensors)."""
    if not _INFO.distributed:
        return model
    if parallel == "fsdp2":
        from torch.distributed.fsdp import FSDPModule, fully_shard  # here, not at the top: +0.9 s on every import

        # The head returns a slice (the true vocabulary); nothing writes into logits in place, so FSDP2's warning about
        # views does not apply.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        # One FSDP unit per transformer block (their weights are gathered one block at a time), then the root
        # (embeddings, head, final norm). Applied from outside the model, as torchtitan does.
        for block in getattr(getattr(model, "encoder", None), "blocks", []):
            fully_shard(block)
        fully_shard(model)
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)  # the loss is already divided by the global |A(x)|: sum, not mean
                m.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)
        return model
    if parallel != "ddp":
        raise UserError(f"train.parallel must be 'ddp' or 'fsdp2', got {parallel!r}")
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[_INFO.device.index] if _INFO.device.type == "cuda" else None)
    ddp.register_comm_hook(state=None, hook=_sum_hook)
    return ddp


def grad_sync(model: torch.nn.Module, sync: bool):
    """Reduce gradients only after the last micro-batch of a step (the others accumulate locally)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if sync else model.no_sync()
    if _INFO.distributed and hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Total gradient norm over all ranks' shards (a plain tensor), after clipping to max_norm."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2 returns a DTensor


def full_state_dicts(model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state on CPU (on rank 0; a collective under FSDP2). Optimizer state is keyed by
    parameter name, so one file resumes under one process, DDP or FSDP2 at any world size."""
    # imported here, not at the top: 0.2 s that only runs that save need
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, _optimizers(optimizer), options=opts)


def load_model_state(model: torch.nn.Module, state: dict) -> None:
    """Full (unsharded) weights into a model, wrapped or not: FSDP2 keeps each rank's shard."""
    if is_sharded(list(model.parameters())):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state)


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict) -> None:
    """The inverse of full_state_dicts for the optimizer: every rank passes the full state; FSDP2 keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, _optimizers(optimizer), state, options=StateDictOptions(full_state_dict=True))


def _optimizers(optimizer) -> tuple:
    """The torch optimizers behind one (optim.MuonAdamW holds two), as torch's state-dict functions take them: their
    state keyed by parameter name, one file for both."""
    return tuple(getattr(optimizer, "optimizers", (optimizer,)))


def shutdown() -> None:
    """Leave the process group (torchrun warns about groups left open at exit); back to one process."""
    global _INFO
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _INFO = DistInfo()


def end_process(code: int = 0) -> None:
    """End a torchrun worker whose work is done (after shutdown) without interpreter finalization; on one process,
    return and let the caller exit normally.

    Gloo's worker threads outlive destroy_process_group (torch's own caches keep the group alive) and may drop the
    last reference to a finished collective's tensors late, which takes the GIL. A thread that asks for the GIL once
    Py_FinalizeEx has begun is made to exit inside that C++ destructor, and the process aborts with "terminate called
    without an active exception" (core dumps of the 2-rank FSDP2 evaluation: ~AsyncAllgatherWork in
    ProcessGroupGloo::runLoop -> take_gil -> pthread_exit while the main thread is in Py_FinalizeEx; 2 aborts in 8
    runs, 2 in 30 with a barrier before destroy_process_group, 0 in 36 with this). Skipping finalization leaves no
    moment at which a thread can be made to exit; output is flushed first.
    """
    if env_world()[1] <= 1:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
