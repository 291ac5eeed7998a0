"""The row loader (order, rank slices, resume, prefetch) and the optimizer pieces (param groups, LR schedules)."""

import math

import numpy as np
import pytest
import torch

from maskedlm.config import OptimConfig, load_config
from maskedlm.data.loader import RowLoader, epoch_permutation
from maskedlm.errors import UserError
from maskedlm.model import MaskedLM
from maskedlm.optim import Schedule, build_optimizer, param_groups


class FakeStore:
    """Row r holds the value r everywhere, so a batch tells which rows it holds."""

    seq_len = 4

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def rows(self, idx):
        idx = np.asarray(idx, dtype=np.int64)
        return np.repeat(idx[:, None], self.seq_len, 1), np.zeros((len(idx), self.seq_len), np.uint8)


def _rows(batch):
    return [int(r) for mb in batch.micro for r in mb.row_index]


def test_epochs_are_permutations_keyed_by_seed_and_epoch():
    loader = RowLoader(FakeStore(50), global_batch_rows=8, micro_batch_rows=4, seed=3)
    assert loader.steps_per_epoch == 6  # 2 trailing rows skipped in each epoch
    seen = [_rows(loader.next_step()) for _ in range(6)]
    flat = sum(seen, [])
    assert len(set(flat)) == 48 and flat == list(epoch_permutation(50, 3, 0)[:48])
    nxt = loader.next_step()
    assert nxt.epoch == 1 and _rows(nxt) == list(epoch_permutation(50, 3, 1)[:8])
    assert list(epoch_permutation(50, 3, 0)) != list(epoch_permutation(50, 4, 0))
    for mb in nxt.micro:  # ids carry the row index (FakeStore), so rows and indices line up
        assert torch.equal(mb.ids[:, 0], mb.row_index)


def test_ranks_split_each_global_batch_disjointly():
    one = RowLoader(FakeStore(64), 16, 4, seed=1)
    two = [RowLoader(FakeStore(64), 16, 4, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(7):
        whole = _rows(one.next_step())
        parts = [_rows(loader.next_step()) for loader in two]
        assert parts[0] + parts[1] == whole
        assert len(parts[0]) == 8 and not set(parts[0]) & set(parts[1])


def test_state_dict_resumes_exactly_and_checks_the_data():
    a = RowLoader(FakeStore(40), 8, 8, seed=0)
    for _ in range(7):
        a.next_step()
    state = a.state_dict()
    b = RowLoader(FakeStore(40), 8, 8, seed=0)
    b.load_state_dict(state)
    for _ in range(5):
        assert _rows(a.next_step()) == _rows(b.next_step())
    with pytest.raises(UserError, match="rows"):
        RowLoader(FakeStore(41), 8, 8, seed=0).load_state_dict(state)


def test_prefetch_thread_yields_the_same_batches_and_transform():
    calls = []

    def transform(mb, position):
        calls.append(position)
        return mb.ids.sum()

    plain = RowLoader(FakeStore(30), 6, 3, seed=2)
    pre = RowLoader(FakeStore(30), 6, 3, seed=2, transform=transform, prefetch_steps=2)
    try:
        for step in range(9):
            p, q = plain.next_step(), pre.next_step()
            assert _rows(p) == _rows(q) and q.position == step
            assert int(q.micro[0].masked) == int(q.micro[0].ids.sum())
        state = pre.state_dict()
        assert state["position"] == 9  # consumed steps, not prefetched ones
    finally:
        pre.close()


def test_batch_split_errors_are_clear():
    with pytest.raises(UserError, match="divisible"):
        RowLoader(FakeStore(100), 10, 4)
    with pytest.raises(UserError, match="divisible"):
        RowLoader(FakeStore(100), 12, 4, world_size=5)
    with pytest.raises(UserError, match="fewer than train.global_batch_rows"):
        RowLoader(FakeStore(5), 8, 8)


def test_param_groups_leave_biases_norms_and_embeddings_undecayed():
    cfg = load_config("tiny", ["model.vocab_size=45"])
    model = MaskedLM(cfg.model)
    groups = param_groups(model, cfg.optim)
    decayed = {id(p) for p in groups[0]["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert groups[0]["weight_decay"] == cfg.optim.weight_decay and groups[1]["weight_decay"] == 0.0
    for n, p in model.named_parameters():
        want = p.ndim >= 2 and "embeddings" not in n
        assert (id(p) in decayed) == want, n
    assert sum(len(g["params"]) for g in groups) == len({id(p) for p in model.parameters()})
    with_emb = param_groups(model, OptimConfig(decay_embeddings=True))
    assert any("embeddings" in names[id(p)] for p in with_emb[0]["params"])
    opt = build_optimizer(model, cfg.optim)
    assert isinstance(opt, torch.optim.AdamW)


def test_linear_cosine_constant_and_wsd_lr_equal_hand_values_by_step():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="linear", min_lr_ratio=0.0)
    s = Schedule(cfg, total_steps=110)
    assert s.lr(0) == pytest.approx(0.1) and s.lr(9) == pytest.approx(1.0)
    assert s.lr(10) == pytest.approx(1.0) and s.lr(60) == pytest.approx(0.5) and s.lr(110) == pytest.approx(0.0)
    cos = Schedule(OptimConfig(lr=2.0, warmup_steps=0, schedule="cosine", min_lr_ratio=0.1), total_steps=100)
    assert cos.lr(0) == pytest.approx(2.0) and cos.lr(50) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
    assert cos.lr(100) == pytest.approx(0.2)
    const = Schedule(OptimConfig(lr=1.0, warmup_steps=4, schedule="constant"), total_steps=100)
    assert const.lr(1) == pytest.approx(0.5) and const.lr(99) == 1.0
    wsd = Schedule(OptimConfig(lr=1.0, warmup_steps=0, schedule="wsd", decay_fraction=0.2), total_steps=100)
    assert wsd.lr(79) == 1.0 and wsd.lr(90) == pytest.approx(0.5) and wsd.lr(100) == pytest.approx(0.0)


def test_schedule_by_elapsed_time_ends_at_the_budget():
    s = Schedule(OptimConfig(lr=1.0, warmup_steps=5, schedule="linear"), total_steps=None)
    assert s.lr(0, 0.0) == pytest.approx(0.2)  # warmup is counted in steps
    assert s.lr(100, 0.25) == pytest.approx(0.75) and s.lr(1000, 1.0) == pytest.approx(0.0)
    cos = Schedule(OptimConfig(lr=1.0, warmup_steps=0, schedule="cosine"), total_steps=None)
    assert cos.lr(7, 0.5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    # with both budgets, whichever is further along drives the decay
    both = Schedule(OptimConfig(lr=1.0, warmup_steps=0, schedule="linear"), total_steps=100)
    assert both.lr(10, 0.5) == pytest.approx(0.5) and both.lr(80, 0.5) == pytest.approx(0.2)
