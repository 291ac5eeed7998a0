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

from maskedlm.config import ModelConfig
from maskedlm.errors import UserError
from maskedlm.finetune import finetune, length_batches, predict
from maskedlm.metrics import StepProgress
from maskedlm.suite import read_suite, run_suite, show_suite
from maskedlm.tasks import TaskData, get_task
from maskedlm.tasks.config import load_finetune_config
from maskedlm.tasks.encode import Encoded, collate
from maskedlm.tasks.heads import TaskModel
from maskedlm.tasks.read import Examples
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
    ('[[task]]\nname = "a"\ntrain = "x"\neval = "y"\nmetric = "spearman"\n', "metric must be one of accuracy"),
    ('[[task]]\nname = "a"\ntrain = "x"\neval = "y"\ntask = "rank"\n', "task must be one of classify"),
])
def test_bad_suite_files_are_refused_with_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "suite.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        read_suite(path)


# ------------------------------------------------------------------------------------------------ the sweep
def test_auto_lr_picks_the_rate_with_the_best_eval_score_and_reuses_its_run(model, tmp_path, capsys):
    """A model at its initial weights and 24 steps: 1e-7 moves nothing, 1.0 (the largest rate allowed) wrecks it, 3e-3 learns the task."""
    files = _task(tmp_path / "t")
    r = finetune(model, files["train"], files["eval"], tmp_path / "o", test=files["test"], seeds=2,
                 overrides=["finetune.lr=auto", "finetune.lr_grid=[1e-7, 3e-3, 1.0]", "finetune.max_steps=24",
                            "finetune.dropout=0"])
    grid = r["lr_sweep"]["grid"]
    scores = [p["eval"]["accuracy"] for p in grid]
    assert [p["lr"] for p in grid] == [1e-7, 3e-3, 1.0]
    assert scores[1] >= 0.9 and max(scores[0], scores[2]) <= 0.75, scores  # one rate clearly best
    assert r["lr"] == r["lr_sweep"]["picked"] == 3e-3
    # the winner's run is seed 0 of the seeds; one more seed runs at the picked rate: 3 + 2 - 1 runs in all
    assert [s["seed"] for s in r["seeds"]] == [0, 1] and r["seeds"][0]["eval"] == grid[1]["eval"]
    assert r["lr_sweep"]["runs"] == 4 and r["lr_sweep"]["cost_vs_fixed_lr"] == 2.0
    err = capsys.readouterr().err
    assert "finetune.lr=auto: 3 rates (1e-07, 0.003, 1) x seed 0, then 1 more seed(s) at the best: 4 runs" in err
    assert "picked 0.003" in err
    recs = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert {x["lr"] for x in recs if "lr" in x} == {1e-7, 3e-3, 1.0}


def test_a_given_lr_runs_no_sweep(model, tmp_path):
    files = _task(tmp_path / "t", n=(32, 16, 16))
    r = finetune(model, files["train"], files["eval"], tmp_path / "o", overrides=["finetune.lr=1e-3",
                                                                                  "finetune.max_steps=2"])
    assert r["lr"] == 1e-3 and r["lr_sweep"] is None


@pytest.mark.parametrize("family,own", [("bert", 0.1), ("modern", 0.0), ("modern", 0.2)])
def test_default_dropout_is_the_models_own_as_transformers_loads_it(family, own):
    """finetune.dropout=auto (the default) takes model.dropout, what transformers reads from config.json; a number
    overrides it for every dropout of the task model (hidden, attention, classifier)."""
    mcfg = ModelConfig(family=family, vocab_size=64, hidden=32, layers=1, heads=2, intermediate=48,
                       max_positions=64, dropout=own, attention_dropout=own)
    for overrides, want in (([], own), (["finetune.dropout=0.3"], 0.3)):
        fcfg = load_finetune_config(overrides)
        m = TaskModel(mcfg, get_task("classify"), 2, fcfg.dropout_for(mcfg))
        drops = {mod.p for mod in m.modules() if isinstance(mod, torch.nn.Dropout)}
        assert drops == {want} and m.cfg.attention_dropout == want, (overrides, drops)


@pytest.mark.parametrize("supported", [True, False])
def test_default_precision_is_bf16_on_a_cpu_that_runs_it(monkeypatch, supported):
    import maskedlm.finetune as ft

    monkeypatch.setattr(ft, "_cpu_bf16", lambda: supported)
    with ft._autocast(load_finetune_config([]), torch.device("cpu")):
        y = torch.nn.Linear(4, 4)(torch.ones(2, 4))
    assert y.dtype == (torch.bfloat16 if supported else torch.float32)
    with ft._autocast(load_finetune_config(["finetune.precision=fp32"]), torch.device("cpu")):
        assert torch.nn.Linear(4, 4)(torch.ones(2, 4)).dtype == torch.float32


# ------------------------------------------------------------------------------------------------ padding
@pytest.mark.parametrize("family", ["bert", "modern"])
def test_length_sorted_batches_give_the_logits_of_full_padding_in_file_order(family):
    mcfg = ModelConfig(family=family, vocab_size=50, hidden=32, layers=2, heads=4, intermediate=48, max_positions=64,
                       layer_norm_eps=1e-5, pad_vocab_multiple=8)
    torch.manual_seed(0)
    net = TaskModel(mcfg, get_task("classify"), 3, dropout=0.1).eval()
    rng = random.Random(0)
    rows = [[2, *(rng.randrange(5, 50) for _ in range(rng.randint(1, 30))), 3] for _ in range(23)]
    enc = Encoded(rows, [[0] * len(r) for r in rows], None, 0)
    full = torch.zeros(len(rows), 40, dtype=torch.long)  # every row padded to 40, as a fixed-length pipeline would
    mask = torch.zeros_like(full)
    for i, r in enumerate(rows):
        full[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    with torch.no_grad():
        want = net(full, mask, torch.zeros_like(full))  # (N, 3)
        batches = length_batches(enc, 4)
        assert sorted(i for b in batches for i in b) == list(range(len(rows)))
        for b in batches:
            ids, m, types = collate(enc, b, 0)
            assert ids.shape[1] == max(len(rows[i]) for i in b)  # each batch to its own longest row
            torch.testing.assert_close(net(ids, m, types), want[b], atol=1e-5, rtol=1e-5)
    names = ["x", "y", "z"]
    data = TaskData(get_task("classify"), names, {"eval": Examples("e", [""] * len(rows), None, ["x"] * len(rows))},
                    {"eval": enc})
    fcfg = load_finetune_config(["finetune.eval_batch_rows=4"])
    assert predict(net, data, "eval", fcfg, torch.device("cpu")) == [names[k] for k in want.argmax(-1).tolist()]


def test_suite_from_the_command_line_and_its_table_from_report(model, tmp_path, capsys):
    from maskedlm.cli import main

    suite = _suite(tmp_path, [("tiny", _task(tmp_path / "t", n=(32, 16, 16)))])
    out = tmp_path / "out"
    main(["finetune", str(model), "--suite", str(suite), "--out", str(out), "finetune.lr=1e-3",
          "finetune.max_steps=2"])
    printed = capsys.readouterr().out
    assert printed.startswith("| task | metric | eval (median) | test (median) | seeds | lr |")
    main(["report", str(out)])
    assert capsys.readouterr().out.endswith((out / "suite.md").read_text())
    assert json.loads((out / "suite.json").read_text())["tasks"][0]["lr"] == 1e-3
    for argv, message in (([], "finetune needs --train FILE and --eval FILE (or --suite SUITE.toml)"),
                          (["--suite", str(suite), "--train", "x.csv"], "--train does not go with --suite"),
                          (["--suite", str(suite)], "already holds a suite output")):
        with pytest.raises(SystemExit) as e:
            main(["finetune", str(model), "--out", str(out), *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err
