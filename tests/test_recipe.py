"""The modern recipe's data knobs: batch-size warmup (the ramp against its rule walked step by step here, exact across
accumulation and ranks, resumed bit-identically, the LR counting tokens), sequence-length phases (rows cut exactly,
the switch at its share of the tokens) and the loss-spike guard (a planted bad batch rolled back and skipped)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from train_data import make_data

from maskedlm.config import OptimConfig, load_config
from maskedlm.data.loader import MixLoader, RowLoader, cut_rows
from maskedlm.data.shards import open_split
from maskedlm.errors import UserError
from maskedlm.model import attention_bias
from maskedlm.optim import BatchPlan, Schedule
from maskedlm.train import train

QUIET = ["train.log_every_steps=1000", "eval.every_steps=0"]
RAMP = ["train.batch_warmup_tokens=3000", "train.batch_warmup_start_rows=4"]  # tiny: 16 rows of 32 tokens per full step

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"), rows=256, val_rows=0, seq_len=32, words=40, cluster=4)


def _weights(run, step=None):
    ck = Path(run) / "checkpoints"
    name = f"step_{step:07d}" if step is not None else (ck / "latest").read_text().strip()
    return load_file(str(ck / name / "model.safetensors"))


def _metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ batch warmup
def _walk(G, start, W, T, steps):
    """The rule as docs/usage.md states it, step by step: rows = the line start + (G − start)·τ/W at the tokens τ
    seen so far, rounded down to a multiple of start, at least start, at most G."""
    out, tau = [], 0
    for _ in range(steps):
        line = start + (G - start) * tau / W
        rows = min(G, max(start, int(line // start) * start))
        out.append((rows, tau))
        tau += rows * T
    return out


@pytest.mark.parametrize("G, start, W, T", [(16, 4, 6000, 32), (32, 8, 1_000_000, 128), (12, 3, 777, 16), (8, 2, 64, 8)])
def test_the_ramp_follows_its_rule_step_by_step(G, start, W, T):
    cfg = load_config("tiny", [f"train.global_batch_rows={G}", f"train.micro_batch_rows={start}",
                               f"train.batch_warmup_tokens={W}", f"train.batch_warmup_start_rows={start}"])
    plan = BatchPlan(cfg.train, T)
    walked = _walk(G, start, W, T, plan.levels[-1][0] + 50)
    assert [plan.rows(s) for s in range(len(walked))] == [r for r, _ in walked]
    assert [plan.tokens_before(s) for s in range(len(walked))] == [t for _, t in walked]
    assert plan.rows(plan.levels[-1][0] - 1) < G == plan.rows(plan.levels[-1][0])  # the ramp ends where the rule says
    for tokens in (1, W // 3, W, W + 1, 10 * W):
        s = plan.steps_for_tokens(tokens)
        assert plan.tokens_before(s) >= tokens > plan.tokens_before(s - 1)
    off = BatchPlan(load_config("tiny").train, T)
    assert [off.tokens_before(s) for s in range(5)] == [s * 16 * T for s in range(5)] and off.clock(7) == 7.0


def test_the_lr_schedule_counts_tokens_while_the_batch_ramps():
    cfg = load_config("tiny", RAMP)
    plan = BatchPlan(cfg.train, 32)
    ocfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="linear")
    sched = Schedule(ocfg, total_steps=100, clock=plan.clock)
    full_steps = [plan.tokens_before(s) / (16 * 32) for s in range(101)]  # tokens seen, in full-batch steps
    for s in (0, 3, 10, 20, 40, 99):
        warm = min(1.0, full_steps[s + 1] / 10)
        q = max(0.0, (full_steps[s] - 10) / (full_steps[100] - 10))
        assert sched.lr(s) == pytest.approx(warm * (1 - q), rel=1e-12), s
    assert sched.lr(3) < Schedule(ocfg, total_steps=100).lr(3)  # a quarter-size step warms up a quarter as far


def test_on_two_ranks_the_ramp_splits_each_step_into_the_rows_of_one_rank(data):
    """Exact at any world size: per step, rank 0 then rank 1 of two hold exactly the rows one process takes,
    through the ramp and past two epoch ends (256 rows: 16 full steps an epoch)."""
    plan = BatchPlan(load_config("tiny", RAMP).train, 32)
    store = open_split(data, "train")
    one = RowLoader(store, 16, 4, seed=3, plan=plan)
    two = [RowLoader(store, 16, 2, seed=3, rank=r, world_size=2, plan=plan) for r in (0, 1)]
    seen = []
    for s in range(60):
        a = torch.cat([mb.row_index for mb in one.next_step().micro])
        b = torch.cat([mb.row_index for ld in two for mb in ld.next_step().micro])
        assert torch.equal(a, b) and len(a) == plan.rows(s), s
        seen.append(one._locate(s))
    epochs = [e for e, _, _ in seen]
    assert epochs[-1] >= 2 and all(at + rows <= len(store) for _, at, rows in seen)
    with pytest.raises(UserError, match=r"batch_warmup_start_rows \(4\) must be divisible by the world size \(8\)"):
        RowLoader(store, 16, 2, rank=0, world_size=8, plan=plan)


def test_the_ramp_is_exact_across_accumulation_and_resumes_bit_identically(data, tmp_path):
    common = ["train.max_steps=20", "optim.warmup_steps=0", "checkpoint.every_steps=6", "checkpoint.keep=5",
              "train.precision=fp32", "train.seq_len_phases=16:0.4,32", *RAMP, *QUIET]
    train("tiny", data, tmp_path / "a", common + ["train.micro_batch_rows=16"])
    train("tiny", data, tmp_path / "b", common + ["train.micro_batch_rows=4"])
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-5)
    recs = [r for r in _metrics(tmp_path / "a") if r.get("kind") is None]
    plan = BatchPlan(load_config("tiny", RAMP).train, 32)
    assert [r["batch_rows"] for r in recs] == [plan.rows(s) for s in range(20)] and recs[0]["batch_rows"] == 4
    assert [r["tokens"] for r in recs] == [plan.tokens_before(s + 1) for s in range(20)]
    # the phase boundary: 16-token rows until 40% of the run's tokens, then the prepared 32
    total = plan.tokens_before(20)
    assert [r["row_len"] for r in recs] == [16 if plan.tokens_before(s) < 0.4 * total else 32 for s in range(20)]
    assert {16, 32} <= {r["row_len"] for r in recs}
    # resume from step 6 (inside the ramp, inside the short phase)
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "a", cut)
    for d in (cut / "checkpoints").glob("step_*"):
        if int(d.name[5:]) > 6:
            shutil.rmtree(d)
    (cut / "checkpoints" / "latest").write_text("step_0000006\n")
    train(None, data, cut, resume=True)
    c = _weights(cut)
    assert all(torch.equal(a[k], c[k]) for k in a)
    timing = ("tokens_per_s", "elapsed_s")
    assert _metrics(tmp_path / "a") == [{**r, **{k: m[k] for k in timing if k in m}}
                                        for r, m in zip(_metrics(cut), _metrics(tmp_path / "a"))]


@pytest.mark.parametrize("over, words", [
    (["train.batch_warmup_tokens=1000"], "train.batch_warmup_start_rows must be a divisor of train.global_batch_rows (16) below it, got 0"),
    (["train.batch_warmup_tokens=1000", "train.batch_warmup_start_rows=5"], "divisor of train.global_batch_rows (16)"),
    (["train.seq_len_phases=64:0.3"], "train.seq_len_phases must look like '64:0.3,128'"),
    (["train.seq_len_phases=16:0.5,8:0.4,32"], "increasing fractions"),
    (["train.seq_len_phases=12:0.5,32"], "12 does not divide the prepared seq_len 32"),
    (["train.seq_len_phases=16:0.5,32", "train.max_steps=0", "train.max_minutes=1"], "a time budget alone"),
    (["train.spike_guard_nats=1", "checkpoint.every_steps=0"], "needs checkpoint.every_steps > 0"),
])
def test_bad_knob_settings_are_refused_in_one_line(data, tmp_path, over, words):
    with pytest.raises(UserError) as e:
        train("tiny", data, tmp_path / "run", ["train.max_steps=2", *QUIET, *over])
    assert words in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()  # refused before anything is written


# ------------------------------------------------------------------------------------------------ phases
def test_cut_rows_are_exact_rows_each_starting_with_cls():
    B, T, n = 3, 32, 8
    ids = torch.arange(B * T).reshape(B, T) + 100
    ids[:, 0] = 2  # [CLS]
    flags = torch.randint(0, 4, (B, T), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    flags[1, 8] |= 1  # a document starting at the first content token of piece 1 of row 1
    keys = torch.tensor([5, 9, 11])
    cid, cfl, ckey = cut_rows(ids, flags, keys, n)
    pieces = T // n
    assert cid.shape == (B * pieces, n) and cfl.shape == cid.shape
    for r in range(B):
        for j in range(pieces):
            row = r * pieces + j
            lo = 1 + j * (n - 1)
            assert cid[row, 0] == 2 and cfl[row, 0] == flags[r, 0]
            assert torch.equal(cid[row, 1:], ids[r, lo:lo + n - 1]) and torch.equal(cfl[row, 1:], flags[r, lo:lo + n - 1])
            assert ckey[row] == keys[r] * pieces + j
    assert len(set(ckey.tolist())) == B * pieces
    # of the 31 content tokens of a row, 4 pieces of 7 hold the first 28; the last 3 are left out
    assert cid[:, 1:].reshape(B, -1).tolist() == ids[:, 1:29].tolist()
    # document attention within a piece is the row's, restricted to the piece ([CLS] joining the first segment)
    full = attention_bias((flags & 1).bool(), None, T, "cpu")[:, 0]  # (B, T, T)
    part = attention_bias((cfl & 1).bool(), None, n, "cpu")[:, 0]  # (B·pieces, n, n)
    for r in range(B):
        for j in range(pieces):
            idx = torch.tensor([1 + j * (n - 1) + i for i in range(n - 1)])
            assert torch.equal(part[r * pieces + j, 1:, 1:], full[r][idx][:, idx]), (r, j)


class _Store:
    """Rows of 16 tokens: [CLS], then source·1000 + row·20 + position, so every token says where it came from."""

    seq_len = 16

    def __init__(self, source, n):
        self.source, self.n = source, n

    def __len__(self):
        return self.n

    def rows(self, idx):
        idx = np.asarray(idx, np.int64)
        ids = self.source * 1000 + idx[:, None] * 20 + np.arange(16)[None, :]
        ids[:, 0] = 2
        return ids, np.zeros(ids.shape, np.uint8)


def test_a_mixture_cuts_its_rows_too_and_refuses_a_ramp():
    cfg = load_config("tiny", ["train.global_batch_rows=8", "train.max_steps=10", "train.seq_len_phases=8:0.5,16"])
    plan = BatchPlan(cfg.train, 16)
    plan.total_tokens = plan.tokens_before(10)
    loader = MixLoader([_Store(0, 40), _Store(1, 30)], [0.5, 0.5], 8, 4, seed=1, plan=plan)
    for s in range(10):
        for mb in loader.next_step().micro:
            n = 8 if s < 5 else 16
            assert mb.ids.shape == (4 * 16 // n, n) and bool((mb.ids[:, 0] == 2).all())
            assert torch.equal(mb.ids[:, 1] // 1000, mb.source)  # each piece keeps its row's source
            assert len(set(mb.row_index.tolist())) == len(mb.row_index)
    ramp = BatchPlan(load_config("tiny", RAMP).train, 16)
    with pytest.raises(UserError, match="not supported with a mixture"):
        MixLoader([_Store(0, 40), _Store(1, 30)], [0.5, 0.5], 16, 4, plan=ramp)


# ------------------------------------------------------------------------------------------------ spike guard
def _plant(monkeypatch, position):
    """Every target of global batch `position` becomes [PAD]: a batch whose loss is far above the rest."""
    build = RowLoader._build

    def planted(self, pos):
        batch = build(self, pos)
        if pos == position:
            for mb in batch.micro:
                t = mb.masked.targets
                mb.masked.targets = torch.where(t >= 0, torch.zeros_like(t), t)
        return batch

    monkeypatch.setattr(RowLoader, "_build", planted)


def test_a_planted_bad_batch_is_rolled_back_and_its_data_skipped(data, tmp_path, monkeypatch):
    guard = ["train.max_steps=20", "checkpoint.every_steps=5", "checkpoint.keep=5", "train.precision=fp32",
             "train.spike_guard_nats=0.5", "train.spike_window_steps=5", "optim.warmup_steps=0", *QUIET]
    # the reference: the same run without the bad batch, put back at step 10 with its loader past positions 10-12
    ref = tmp_path / "ref"
    train("tiny", data, ref, guard)
    for d in (ref / "checkpoints").glob("step_*"):
        if int(d.name[5:]) > 10:
            shutil.rmtree(d)
    (ref / "checkpoints" / "latest").write_text("step_0000010\n")
    state_file = ref / "checkpoints" / "step_0000010" / "state.json"
    state = json.loads(state_file.read_text())
    state["loader"]["position"] = 13
    state_file.write_text(json.dumps(state))
    train(None, data, ref, resume=True)

    _plant(monkeypatch, 12)  # the batch of step 13
    run = tmp_path / "run"
    res = train("tiny", data, run, guard)
    assert res["step"] == 20
    recs = _metrics(run)
    back = [r for r in recs if r.get("kind") == "rollback"]
    assert len(back) == 1 and back[0]["step"] == 13 and back[0]["to_step"] == 10 and back[0]["data_position"] == 13
    assert back[0]["loss"] > back[0]["median"] + 0.5
    steps = [r["step"] for r in recs if r.get("kind") is None]
    assert steps == list(range(1, 21))  # the abandoned steps 11-13 were dropped and taken again
    a, b = _weights(run), _weights(ref)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((run / "checkpoints" / "step_0000020" / "state.json").read_text())["loader"]["position"] == 23


def test_without_the_guard_the_bad_batch_is_trained_on(data, tmp_path, monkeypatch):
    _plant(monkeypatch, 12)
    run = tmp_path / "run"
    train("tiny", data, run, ["train.max_steps=14", "checkpoint.every_steps=5", "optim.warmup_steps=0", *QUIET])
    recs = _metrics(run)
    assert not any(r.get("kind") == "rollback" for r in recs)
    losses = [r["loss"] for r in recs]
    assert losses[12] > np.median(losses[7:12]) + 0.5  # the planted batch does spike: the guard test above is live


@pytest.mark.slow
def test_two_processes_ramp_as_one_process_with_accumulation(data, tmp_path):
    """The ramp under torchrun: 2 gloo ranks give the weights of 1 process (float summation order aside)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    over = ["--config", "tiny", "--data", str(data), "train.max_steps=18", "train.micro_batch_rows=4",
            "train.seq_len_phases=16:0.3,32", *RAMP, *QUIET]
    for out, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--nproc-per-node", "2"])):
        done = subprocess.run([sys.executable, *launcher, "-m", "maskedlm", "train", "--out", str(tmp_path / out), *over],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)
