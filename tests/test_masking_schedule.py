"""Rate schedules in a run: masking.rate_schedule_steps 0 takes the run's total steps (from train.max_steps
or train.max_tokens), the masks then follow that schedule, and a resume from a checkpoint is bit-identical."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_data import make_data

from maskedlm.config import MaskingConfig
from maskedlm.errors import UserError
from maskedlm.masking import rate_at
from maskedlm.train import train

QUIET = ["train.log_every_steps=1000", "eval.every_steps=0"]
LINEAR = ["masking.rate_schedule=linear", "masking.rate_start=0.4", "masking.rate_end=0.15"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"), rows=64, val_rows=8, seq_len=16, words=40, cluster=4)


def _weights(run_dir, step):
    return load_file(str(Path(run_dir) / "checkpoints" / f"step_{step:07d}" / "model.safetensors"))


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _saved_steps(run_dir) -> int:
    return json.loads((Path(run_dir) / "config.json").read_text())["masking"]["rate_schedule_steps"]


def test_schedule_length_is_the_runs_steps_and_resume_is_exact(data, tmp_path, capsys):
    over = [*LINEAR, *QUIET, "train.max_steps=6", "checkpoint.every_steps=3", "checkpoint.keep=5"]
    full = tmp_path / "full"
    train("tiny", data, full, over)
    assert "rate linear 0.4 → 0.15 over 6 steps (from train.max_steps)" in capsys.readouterr().out
    assert _saved_steps(full) == 6  # in the run's config.json, so every later reader sees the same schedule
    ck = json.loads((full / "checkpoints" / "step_0000006" / "config.json").read_text())
    assert ck["masking"]["rate_schedule_steps"] == 6
    # the filled-in run is the run with the length given explicitly ...
    explicit = tmp_path / "explicit"
    train("tiny", data, explicit, [*over, "masking.rate_schedule_steps=6"])
    assert _equal(_weights(full, 6), _weights(explicit, 6))
    # ... and not one with another length (the schedule reaches the masks: this comparison can fail)
    other = tmp_path / "other"
    train("tiny", data, other, [*over, "masking.rate_schedule_steps=2"])
    assert not _equal(_weights(full, 6), _weights(other, 6))
    # resume from step 3, passing the same config again (rate_schedule_steps=0 on the command line): bit-identical
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step_0000006")
    (cut / "checkpoints" / "latest").write_text("step_0000003\n")
    res = train("tiny", data, cut, over, resume=True)
    assert res["step"] == 6 and _saved_steps(cut) == 6
    assert _equal(_weights(full, 6), _weights(cut, 6))


def test_schedule_length_from_a_token_budget(data, tmp_path):
    tokens_per_step = 16 * 16  # tiny: global_batch_rows 16, data seq_len 16
    run = tmp_path / "run"
    res = train("tiny", data, run, [*LINEAR, *QUIET, "checkpoint.every_steps=0", f"train.max_tokens={4 * tokens_per_step + 1}"])
    assert res["step"] == 5 and _saved_steps(run) == 5  # ceil(max_tokens / tokens per step)
    cfg = MaskingConfig(rate_schedule="linear", rate_start=0.4, rate_end=0.15, rate_schedule_steps=_saved_steps(run))
    assert rate_at(cfg, 5) == pytest.approx(0.15) and rate_at(cfg, 0) == pytest.approx(0.4)


def test_time_budget_alone_asks_for_the_schedule_length(data, tmp_path):
    with pytest.raises(UserError, match=r"masking.rate_schedule='cosine' with a time budget alone .*set masking.rate_schedule_steps"):
        train("tiny", data, tmp_path / "run", ["masking.rate_schedule=cosine", "masking.rate_start=0.3", "train.max_minutes=1", *QUIET])
    assert not (tmp_path / "run").exists()  # refused before anything was written
    # with a step budget as well, the steps are known and fill the schedule
    run = tmp_path / "both"
    train("tiny", data, run, ["masking.rate_schedule=cosine", "masking.rate_start=0.3", "train.max_minutes=10",
                              "train.max_steps=2", "checkpoint.every_steps=0", *QUIET])
    assert _saved_steps(run) == 2
    # an explicit length is kept as given, whatever the budget
    given = tmp_path / "given"
    train("tiny", data, given, [*LINEAR, "masking.rate_schedule_steps=50", "train.max_steps=2", "checkpoint.every_steps=0", *QUIET])
    assert _saved_steps(given) == 50
