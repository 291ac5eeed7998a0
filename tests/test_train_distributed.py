"""Distributed training on CPU: torchrun with 2 gloo processes gives the weights of 1 process reaching the same global
batch by accumulation (docs/design.md: loss normalisation, one code path), a 2-process checkpoint resumes in 1
process, and sharded evaluation gives the numbers of one process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_data import make_data

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["train.micro_batch_rows=4", "eval.every_steps=3", "train.log_every_steps=1000"]


def _run(args, nproc=1, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)] if nproc > 1 else [sys.executable]
    done = subprocess.run([*launcher, "-m", "maskedlm", "train", *args], env=env, capture_output=True, text=True, timeout=300)
    if check:
        # a rank's one-line error comes first: under torchrun the other rank's traceback can push it out of the tail
        errors = "\n".join(line for line in done.stderr.splitlines() if "maskedlm: error" in line)
        assert done.returncode == 0, errors + "\n" + done.stderr[-3000:]
    return done


def _weights(run, step):
    return load_file(str(Path(run) / "checkpoints" / f"step_{step:07d}" / "model.safetensors"))


def _evals(run):
    return [r for r in map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines()) if r.get("kind") == "eval"]


def _resume_from(src, dst, step, data, nproc, extra=()):
    shutil.copytree(src, dst)
    ck = Path(dst) / "checkpoints"
    for d in ck.glob("step_*"):
        if int(d.name[5:]) > step:
            shutil.rmtree(d)
    (ck / "latest").write_text(f"step_{step:07d}\n")
    _run(["--data", str(data), "--out", str(dst), "--resume", *extra], nproc=nproc)


@pytest.mark.slow
@pytest.mark.parametrize("parallel, optim", [("ddp", "adamw"), ("fsdp2", "adamw"), ("ddp", "muon")])
def test_two_processes_equal_one_process_with_accumulation_and_resume_across_world_sizes(tmp_path, parallel, optim):
    data = make_data(tmp_path / "data", rows=128, val_rows=16, seq_len=32)
    base = ["--config", "tiny", "--data", str(data)]
    over = ["train.max_steps=6", "checkpoint.every_steps=3", f"optim.name={optim}", *COMMON]
    _run([*base, "--out", str(tmp_path / "one"), *over])
    _run([*base, "--out", str(tmp_path / "two"), *over, f"train.parallel={parallel}"], nproc=2)
    a, b = _weights(tmp_path / "one", 6), _weights(tmp_path / "two", 6)
    assert a.keys() == b.keys()
    # Muon orthogonalises in bf16 (torch's Newton-Schulz), which turns the fp32 summation-order differences of a
    # 2-rank gradient into bf16 roundings: 3e-4 after 6 steps here, ~5% of one step's update (lr 3e-3 × 0.2 ×
    # sqrt(128) ≈ 7e-3 per weight); AdamW's steps stay within 1e-5.
    atol = 1e-3 if optim == "muon" else 1e-5
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=atol)
    # the periodic evaluations (sharded over the 2 ranks) score the same rows and positions, at weights within atol
    ev1, ev2 = _evals(tmp_path / "one"), _evals(tmp_path / "two")
    assert [e["step"] for e in ev1] == [e["step"] for e in ev2] == [3, 6]
    for e1, e2 in zip(ev1, ev2):
        assert (e2["val_rows"], e2["val_tokens"]) == (e1["val_rows"], e1["val_tokens"]) == (16, e1["val_tokens"])
        assert e2["val_loss"] == pytest.approx(e1["val_loss"], rel=1e-4)
    # the 2-process run's step-3 checkpoint, resumed by 1 process, continues as the 2-process run did ...
    _resume_from(tmp_path / "two", tmp_path / "two_then_one", 3, data, nproc=1)
    c = _weights(tmp_path / "two_then_one", 6)
    for k in a:
        torch.testing.assert_close(c[k], b[k], rtol=0, atol=atol)
    # ... and the 1-process checkpoint resumes in 2 processes (the optimizer state is re-sharded under FSDP2)
    _resume_from(tmp_path / "one", tmp_path / "one_then_two", 3, data, nproc=2, extra=[f"train.parallel={parallel}"])
    d = _weights(tmp_path / "one_then_two", 6)
    for k in a:
        torch.testing.assert_close(d[k], a[k], rtol=0, atol=atol)


@pytest.mark.slow
def test_muon_under_fsdp2_is_refused_in_one_line(tmp_path):
    """Muon orthogonalises whole matrices; FSDP2 gives each rank a shard of each."""
    data = make_data(tmp_path / "data", rows=64, val_rows=0, seq_len=32)
    done = _run(["--config", "tiny", "--data", str(data), "--out", str(tmp_path / "r"), "optim.name=muon",
                 "train.parallel=fsdp2", "train.max_steps=2", *COMMON], nproc=2, check=False)
    assert done.returncode != 0
    assert "optim.name=muon orthogonalises whole matrices and cannot step FSDP2's shards" in done.stderr


@pytest.mark.slow
def test_a_batch_that_does_not_split_across_ranks_fails_at_start(tmp_path):
    data = make_data(tmp_path / "data", rows=64, val_rows=8, seq_len=16)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "maskedlm", "train",
           "--config", "tiny", "--data", str(data), "--out", str(tmp_path / "run"), "train.max_steps=2",
           "train.global_batch_rows=16", "train.micro_batch_rows=16"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "must be divisible by world size (2) × train.micro_batch_rows (16)" in done.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("pgrep") is None, reason="finds the worker processes with pgrep")
def test_a_rank_that_dies_ends_the_run_instead_of_hanging(tmp_path):
    import signal
    import time

    data = make_data(tmp_path / "data", rows=64, val_rows=8, seq_len=16)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "maskedlm", "train",
           "--config", "tiny", "--data", str(data), "--out", str(run), "train.max_steps=1000000",
           "train.micro_batch_rows=4", "eval.every_steps=0", "checkpoint.every_steps=0", "train.dist_timeout_minutes=1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").stat().st_size):
            time.sleep(0.05)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, workers
        os.kill(int(workers[1]), signal.SIGKILL)  # rank 1 dies mid-run
        proc.wait(timeout=90)  # the launcher stops rank 0 instead of letting it wait in a collective
        assert proc.returncode != 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_each_rank_gets_a_disjoint_share_of_the_items_and_the_same_number_of_iterations(monkeypatch):
    from maskedlm import distributed as dist

    for world in (1, 2, 3, 4):
        for n in (0, 1, 2, 5, 7, 8, 13):
            shares = []
            for r in range(world):
                monkeypatch.setattr(dist, "_INFO", dist.DistInfo(rank=r, world_size=world))
                shares.append(dist.shard_items(n))
            assert len({len(s) for s in shares}) == 1  # every rank runs as many forwards (FSDP2 gathers in each)
            real = sorted(i for s in shares for i in s if i is not None)
            assert real == list(range(n))  # each item exactly once, on exactly one rank
            assert all(s[:len([i for i in s if i is not None])] == [i for i in s if i is not None] for s in shares)
    monkeypatch.setattr(dist, "_INFO", dist.DistInfo())
    assert dist.shard_items(5) == [0, 1, 2, 3, 4]  # one process: everything, in order



def test_a_list_is_shared_out_whole_and_disjoint_or_on_no_rank_when_too_short(monkeypatch):
    from maskedlm import distributed as dist

    for world in (1, 2, 3, 4):
        for n in (0, 1, 2, 3, 5, 8):
            items = [f"x{i}" for i in range(n)]
            shares = []
            for r in range(world):
                monkeypatch.setattr(dist, "_INFO", dist.DistInfo(rank=r, world_size=world))
                shares.append(dist.shard_list(items))
            if n < world:  # some rank would get nothing: every rank is told so alike
                assert shares == [None] * world
            else:
                assert all(s for s in shares) and sorted(x for s in shares for x in s) == sorted(items)
    monkeypatch.setattr(dist, "_INFO", dist.DistInfo())
    assert dist.shard_list([3, 1, 2]) == [3, 1, 2]  # one process: everything, in order

_EVAL_WORKER = """
import json, sys
from pathlib import Path
from maskedlm import distributed as dist
from maskedlm.models import load_checkpoint_model
from maskedlm.config import EvalConfig
from maskedlm.data.shards import open_split
from maskedlm.evaluate import evaluate
from maskedlm.tokenizer import special_ids

run, data, out, parallel, settings = sys.argv[1:6]
dist.init("cpu", timeout_minutes=1)  # a regression that unpairs collectives fails, not hangs
net, cfg, tok = load_checkpoint_model(run)
model = dist.wrap_model(net, "fsdp2") if parallel == "fsdp2" else net  # as train.py passes it (FSDP2 shards in place)
store = open_split(data, "val")
read, rows = [], store.rows
store.rows = lambda index: (read[-1].extend(int(i) for i in index), rows(index))[1]
results = []
for kw in json.loads(settings):
    read.append([])
    results.append(evaluate(model, store, EvalConfig(**kw), special_ids(tok), cfg.model.vocab_size))
reads = dist.all_gather_object(read)  # per rank, per setting: the rows it read, in order
if dist.is_main():
    Path(out).write_text(json.dumps({"results": results, "rows_read": reads}))
dist.shutdown()
dist.end_process(0)  # as the CLI ends a torchrun worker: finalization is where gloo's threads can abort it
"""


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_sharded_evaluation_in_two_processes_equals_one_process(tmp_path, parallel):
    from maskedlm.train import train

    data = make_data(tmp_path / "data", rows=64, val_rows=23, seq_len=32)
    run = tmp_path / "run"
    train("tiny", data, run, ["train.max_steps=20", "eval.every_steps=0", "checkpoint.every_steps=0", "train.log_every_steps=100"])
    worker = tmp_path / "eval_worker.py"
    worker.write_text(_EVAL_WORKER)
    # 23 rows in micro-batches of 3 and 5: an odd number of micro-batches (rank 1 runs one forward it drops, as FSDP2
    # needs) and a short last one; max_rows; whole-word units; a micro-batch larger than the split (rank 1 has nothing).
    settings = [dict(micro_batch_rows=3), dict(micro_batch_rows=5, mask_rate=0.3, seed=9), dict(micro_batch_rows=2, max_rows=9),
                dict(micro_batch_rows=4, unit="word"), dict(micro_batch_rows=64)]
    got = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    for nproc in (1, 2):
        out = tmp_path / f"eval_{nproc}.json"
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)] if nproc > 1 else [sys.executable]
        done = subprocess.run([*launcher, str(worker), str(run), str(data), str(out), parallel, json.dumps(settings)],
                              env=env, capture_output=True, text=True, timeout=300)
        # a rank's one-line error comes first: under torchrun the other rank's traceback can push it out of the tail
        errors = "\n".join(line for line in done.stderr.splitlines() if "maskedlm: error" in line)
        assert done.returncode == 0, errors + "\n" + done.stderr[-3000:]
        got[nproc] = json.loads(out.read_text())
    one, two = got[1]["results"], got[2]["results"]
    for s, a, b in zip(settings, one, two):
        assert b == a, s  # identical numbers, to the bit: same micro-batches, same masks, sums in the same order
        assert a["rows"] == min(23, s.get("max_rows") or 23) and a["tokens"] > 0 and 0 < a["accuracy"] < 1
    assert len({r["loss"] for r in one}) == len(one)  # the settings do change the numbers
    # the work was shared: with 8 micro-batches of 3 rows, each rank read 4 of them, disjoint, together every row once
    first, second = (reads[0] for reads in got[2]["rows_read"])
    assert sorted(first + second) == list(range(23)) and len(first) == 12
    # with 5 micro-batches, rank 1 runs its 2 and a dropped forward on micro-batch 0, so FSDP2's gathers pair up
    first, second = (reads[1] for reads in got[2]["rows_read"])
    assert sorted(set(first + second)) == list(range(23)) and len(first) == 13 and second[-5:] == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_a_mixture_on_two_processes_equals_one_process(tmp_path):
    """Every rank draws its share of the same global mixture batch: 2 gloo processes reach 1 process's weights,
    source_tokens and per-source evaluation."""
    a = make_data(tmp_path / "a", rows=96, val_rows=16, seq_len=32, seed=1)
    b = make_data(tmp_path / "b", rows=24, val_rows=8, seq_len=32, seed=2)
    args = ["--config", "tiny", "--data", str(a), "--data", str(b), "train.max_steps=6", "checkpoint.every_steps=3",
            "data.weights=[0.6,0.4]", *COMMON]
    _run([*args, "--out", str(tmp_path / "one")])
    _run([*args, "--out", str(tmp_path / "two")], nproc=2)
    w1, w2 = _weights(tmp_path / "one", 6), _weights(tmp_path / "two", 6)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5)
    recs = [[json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in ("one", "two")]
    assert [r.get("source_tokens") for r in recs[0]] == [r.get("source_tokens") for r in recs[1]]
    ev1, ev2 = _evals(tmp_path / "one"), _evals(tmp_path / "two")
    for e1, e2 in zip(ev1, ev2):
        assert [s["rows"] for s in e2["val_sources"]] == [s["rows"] for s in e1["val_sources"]] == [16, 8]
        assert e2["val_loss"] == pytest.approx(e1["val_loss"], rel=1e-4)
