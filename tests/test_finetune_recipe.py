"""Fine-tuning's recipe around one run: the learning-rate sweep (finetune.lr=auto), length-sorted evaluation batches,
progress lines, and suites of tasks with their table."""

import json
import random
import statistics
import sys
from io import StringIO
from pathlib import Path

import pytest
import torch

from maskedlm.errors import UserError
from maskedlm.metrics import StepProgress
from maskedlm.suite import read_suite, run_suite, show_suite
from maskedlm.train import train

sys.path.insert(0, str(Path(__file__).parent))
from train_data import make_data  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
QUIET = ["eval.every_steps=0", "checkpoint.every_steps=0", "train.log_every_steps=1000"]
WORDS, CLUSTER = 40, 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny BERT at its initial weights (lr 1e-30: one step moves nothing): fine-tuning has to learn the task."""
    root = tmp_path_factory.mktemp("recipe")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    data = make_data(root / "data", rows=64, val_rows=8, seq_len=32, words=WORDS, cluster=CLUSTER)
    train("tiny", data, root / "model", ["train.max_steps=1", "optim.lr=1e-30", *QUIET])
    torch.set_num_threads(threads)
    return root / "model"


def _task(d: Path, seed: int = 0, n=(160, 80, 80)) -> dict:
    """Two classes told apart by their words (w0-w19 or w20-w39), 3-12 words each: learnable from scratch."""
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, count in zip(("train", "eval", "test"), n):
        lines = []
        for _ in range(count):
            c = rng.randrange(2)
            words = [f"w{c * 20 + rng.randrange(20)}" for _ in range(rng.randint(3, 12))]
            lines.append(json.dumps({"text": " ".join(words), "label": "ab"[c]}))
        files[split] = d / f"{split}.jsonl"
        files[split].write_text("\n".join(lines) + "\n")
    return files


# ------------------------------------------------------------------------------------------------ progress
def test_progress_lines_show_step_numbers_and_eta_when_not_on_a_terminal():
    out, now = StringIO(), [0.0]
    p = StepProgress(10, "seed 0", every=5, progress=False, out=out, clock=lambda: now[0])
    for _ in range(5):
        now[0] += 2.0
        p.step(loss=0.5)
    p.note(accuracy=0.75)
    p.close()
    lines = out.getvalue().splitlines()
    # 5 of 10 steps in 10 s: 10 s to go
    assert lines == ["seed 0: step 5/10, loss 0.5000, elapsed 0:10, ETA 0:10",
                     "seed 0: step 5/10, loss 0.5000, accuracy 0.7500, elapsed 0:10, ETA 0:10"]


# ------------------------------------------------------------------------------------------------ suites
def _suite(tmp_path: Path, tasks: list[tuple[str, dict]], extra: str = "") -> Path:
    text = extra
    for name, files in tasks:
        text += (f'\n[[task]]\nname = "{name}"\ntrain = "{files["train"]}"\neval = "{files["eval"]}"\n'
                 f'test = "{files["test"]}"\n')
    path = tmp_path / "suite.toml"
    path.write_text(text)
    return path


def test_suite_table_equals_the_medians_of_each_tasks_own_records(model, tmp_path, capsys):
    tasks = [("one", _task(tmp_path / "t1", 1, (64, 40, 40))), ("two", _task(tmp_path / "t2", 2, (64, 40, 40)))]
    suite = _suite(tmp_path, tasks, 'seeds = 3\noverrides = ["finetune.lr=1e-3", "finetune.max_steps=4"]\n')
    out = tmp_path / "out"
    r = run_suite(model, suite, out, log=lambda m: None)
    assert [t["name"] for t in r["tasks"]] == ["one", "two"]
    for row in r["tasks"]:
        # each seed's test accuracy as the task's own metrics.jsonl recorded it
        recs = [json.loads(x) for x in (out / row["name"] / "metrics.jsonl").read_text().splitlines()]
        test = [x["accuracy"] for x in recs if x["split"] == "test"]
        evals = {}
        for x in recs:
            if x["split"] == "eval":
                evals[x["seed"]] = max(evals.get(x["seed"], 0.0), x["accuracy"])
        assert len(test) == 3 and row["seeds"] == 3 and row["metric"] == "accuracy"
        assert row["test"] == statistics.median(test) and row["eval"] == statistics.median(evals.values())
    assert r["average"]["test"] == pytest.approx(statistics.fmean(t["test"] for t in r["tasks"]))
    assert json.loads((out / "suite.json").read_text())["tasks"] == r["tasks"]
    shown = show_suite(out)
    for row in r["tasks"]:
        assert f"| {row['name']} | accuracy | {row['eval']:.4f} | {row['test']:.4f} | 3 |" in shown
    assert f"| **average** | | {r['average']['eval']:.4f} | {r['average']['test']:.4f} |" in shown


@pytest.mark.parametrize("text, message", [
    ("", "has no tasks"),
    ('[[task]]\nname = "a"\ntrain = "x.jsonl"\n', "needs eval"),
    ('[[task]]\nname = "a"\ntrain = "x"\neval = "y"\nlr = 3\n', "unknown key 'lr'"),
    ('[[task]]\nname = "a"\ntrain = "x"\neval = "y"\n[[task]]\nname = "a"\ntrain = "x"\neval = "y"\n', "used twice"),
    ('seeds = 0\n[[task]]\nname = "a"\ntrain = "x"\neval = "y"\n', "seeds must be an integer >= 1"),
    ("[[task]\n", "cannot read the suite"),
])
def test_bad_suite_files_are_refused_with_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "suite.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        read_suite(path)
