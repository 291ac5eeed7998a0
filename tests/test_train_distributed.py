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


@pytest.mark.slow
def test_two_processes_equal_one_process_with_accumulation_and_resume_across_world_sizes(tmp_path):
    data = make_data(tmp_path / "data", rows=128, val_rows=16, seq_len=32)
    base = ["--config", "tiny", "--data", str(data)]
    _run([*base, "--out", str(tmp_path / "one"), "train.max_steps=6", "checkpoint.every_steps=3", *COMMON])
    _run([*base, "--out", str(tmp_path / "two"), "train.max_steps=6", "checkpoint.every_steps=3", *COMMON], nproc=2)
    a, b = _weights(tmp_path / "one", 6), _weights(tmp_path / "two", 6)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)
    # the 2-process run's step-3 checkpoint, resumed by 1 process, continues as the 2-process run did
    shutil.copytree(tmp_path / "two", tmp_path / "cont")
    ck = tmp_path / "cont" / "checkpoints"
    shutil.rmtree(ck / "step_0000006")
    (ck / "latest").write_text("step_0000003\n")
    _run(["--data", str(data), "--out", str(tmp_path / "cont"), "--resume"])
    c = _weights(tmp_path / "cont", 6)
    for k in a:
        torch.testing.assert_close(c[k], b[k], rtol=0, atol=1e-5)


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
