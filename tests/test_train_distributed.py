"""Issue 6 on CPU: torchrun with 2 gloo processes gives the weights of 1 process reaching the same global batch by
accumulation (DESIGN 4 and 8), and a 2-process checkpoint resumes in 1 process."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from train_data import make_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["train.micro_batch_rows=4", "eval.every_steps=3", "train.log_every_steps=1000"]


def _run(args, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)] if nproc > 1 else [sys.executable]
    done = subprocess.run([*launcher, "-m", "maskedlm", "train", *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _weights(run, step):
    return load_file(str(Path(run) / "checkpoints" / f"step_{step:07d}" / "model.safetensors"))


def _resume_from(src, dst, step, data, nproc, extra=()):
    shutil.copytree(src, dst)
    ck = Path(dst) / "checkpoints"
    for d in ck.glob("step_*"):
        if int(d.name[5:]) > step:
            shutil.rmtree(d)
    (ck / "latest").write_text(f"step_{step:07d}\n")
    _run(["--data", str(data), "--out", str(dst), "--resume", *extra], nproc=nproc)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_two_processes_equal_one_process_with_accumulation_and_resume_across_world_sizes(tmp_path, parallel):
    data = make_data(tmp_path / "data", rows=128, val_rows=16, seq_len=32)
    base = ["--config", "tiny", "--data", str(data)]
    over = ["train.max_steps=6", "checkpoint.every_steps=3", *COMMON]
    _run([*base, "--out", str(tmp_path / "one"), *over])
    _run([*base, "--out", str(tmp_path / "two"), *over, f"train.parallel={parallel}"], nproc=2)
    a, b = _weights(tmp_path / "one", 6), _weights(tmp_path / "two", 6)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)
    # the 2-process run's step-3 checkpoint, resumed by 1 process, continues as the 2-process run did ...
    _resume_from(tmp_path / "two", tmp_path / "two_then_one", 3, data, nproc=1)
    c = _weights(tmp_path / "two_then_one", 6)
    for k in a:
        torch.testing.assert_close(c[k], b[k], rtol=0, atol=1e-5)
    # ... and the 1-process checkpoint resumes in 2 processes (the optimizer state is re-sharded under FSDP2)
    _resume_from(tmp_path / "one", tmp_path / "one_then_two", 3, data, nproc=2, extra=[f"train.parallel={parallel}"])
    d = _weights(tmp_path / "one_then_two", 6)
    for k in a:
        torch.testing.assert_close(d[k], a[k], rtol=0, atol=1e-5)


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
