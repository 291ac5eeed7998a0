"""Training end to end on a generated corpus: learning, exactness of accumulation and resume, signals, bad input."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_data import make_data

from maskedlm.checkpoint import read_checkpoint
from maskedlm.errors import UserError
from maskedlm.models import load_checkpoint_model
from maskedlm.train import train

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["train.log_every_steps=1000", "eval.every_steps=0", "checkpoint.every_steps=0"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"), rows=256, val_rows=64, seq_len=32, words=40, cluster=4)


def _weights(run_dir):
    ck = Path(run_dir) / "checkpoints"
    return load_file(str(ck / (ck / "latest").read_text().strip() / "model.safetensors"))


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_tiny_model_learns_the_clusters(data, tmp_path, capsys):
    """Each document draws from one cluster of 4 of the 40 words. Without the clusters no model beats the unigram
    entropy log(40) = 3.69 nats per masked token; with them the floor is log(4) = 1.39 (plus the rows' first tokens
    and [SEP]/[MASK]-adjacent cases). Below 2.6 is only reachable by using the context."""
    from maskedlm.data.shards import open_split
    from maskedlm.evaluate import evaluate
    from maskedlm.model import MaskedLM
    from maskedlm.tokenizer import SpecialIds

    out = tmp_path / "run"
    res = train("tiny", data, out, ["train.max_steps=200", "eval.every_steps=200", "train.log_every_steps=50"])
    printed = capsys.readouterr().out
    for words in ("θ (encoder)", "ω (head)", "512 tokens (16 rows)", "2 micro-batches", "200 steps", "train 256 rows"):
        assert words in printed, words
    assert res["step"] == 200 and res["eval"]["loss"] < 2.6, res["eval"]
    recs = [r for r in _metrics(out) if r.get("kind") != "eval"]
    assert [r["step"] for r in recs] == list(range(1, 201))
    for key in ("step", "tokens", "loss", "masked_acc", "lr", "grad_norm", "tokens_per_s"):
        assert key in recs[0]
    assert sum(r["loss"] for r in recs[-20:]) / 20 < sum(r["loss"] for r in recs[:20]) / 20 - 0.8
    assert json.loads((out / "config.json").read_text())["model"]["vocab_size"] == 45
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").iterdir())
    # The saved model is the trained one: the same evaluation from load_checkpoint_model gives the same number.
    model, cfg, tok = load_checkpoint_model(out)
    meta = json.loads((Path(data) / "meta.json").read_text())
    again = evaluate(model, open_split(data, "val"), cfg.eval, SpecialIds(**meta["special_ids"]), 45)
    assert again["loss"] == res["eval"]["loss"]
    assert tok is not None and tok.token_to_id("[MASK]") == 4
    untrained = MaskedLM(cfg.model)
    untrained.init_weights(0)
    before = evaluate(untrained, open_split(data, "val"), cfg.eval, SpecialIds(**meta["special_ids"]), 45)
    assert before["loss"] > 3.5  # ≈ chance: log(45) = 3.81


def test_accumulation_matches_one_big_micro_batch(data, tmp_path):
    """Loss normalisation (docs/design.md): Σ −log p over the step / global |A(x)| — splitting the step into micro-batches changes nothing but
    float summation order."""
    common = ["train.max_steps=4", "optim.warmup_steps=0", *QUIET]
    train("tiny", data, tmp_path / "a", common + ["train.micro_batch_rows=16"])
    train("tiny", data, tmp_path / "b", common + ["train.micro_batch_rows=4"])
    train("tiny", data, tmp_path / "c", common + ["train.micro_batch_rows=4", "train.prefetch=false"])
    a, b, c = _weights(tmp_path / "a"), _weights(tmp_path / "b"), _weights(tmp_path / "c")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-5)
        assert torch.equal(b[k], c[k]), k  # the prefetch thread changes nothing at all


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_from_an_earlier_checkpoint_is_bit_identical(data, tmp_path, precision):
    args = ["train.max_steps=30", "checkpoint.every_steps=10", "checkpoint.keep=5", "train.log_every_steps=1000",
            "eval.every_steps=0", f"train.precision={precision}", "model.dropout=0.1"]  # dropout: the RNG state resumes too
    full = tmp_path / "full"
    train("tiny", data, full, args)
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    ck = cut / "checkpoints"
    for d in ("step_0000020", "step_0000030"):  # as if killed right after step 10 was saved
        shutil.rmtree(ck / d)
    (ck / "latest").write_text("step_0000010\n")
    res = train(None, data, cut, resume=True)
    assert res["step"] == 30
    a, b = _weights(full), _weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timing = ("tokens_per_s", "elapsed_s")  # wall-clock numbers: the only ones a resume may change
    assert _metrics(full) == [{**r, **{k: m[k] for k in timing if k in m}} for r, m in zip(_metrics(cut), _metrics(full))]


def _cli(*args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return [sys.executable, "-m", "maskedlm", "train", *args], env


@pytest.mark.parametrize("moment", ["random-step", pytest.param("during-save", marks=pytest.mark.slow)])
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(data, tmp_path, moment):
    args = ["--config", "tiny", "--data", str(data)]
    over = ["train.max_steps=48", "checkpoint.every_steps=5", "train.log_every_steps=1000", "eval.every_steps=0"]
    ref = tmp_path / "ref"
    train("tiny", data, ref, over)
    run = tmp_path / "run"
    kill_after = random.Random().randint(2, 44)  # a different moment each time: saves every 5 steps, so some land mid-save
    cmd, env = _cli(*args, "--out", str(run), *over)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if moment == "during-save":  # a save in progress: its temporary dir exists
            if any(p.name.startswith(".tmp-") for p in (run / "checkpoints").glob(".tmp-*")):
                break
        elif metrics.exists() and metrics.read_text().count("\n") >= kill_after:
            break
        time.sleep(0.002)
    assert proc.poll() is None, f"run ended before the kill at step {kill_after}: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    train(None, data, run, resume=True)  # in-process: one interpreter start less (the CLI path is the same function)
    a, b = _weights(ref), _weights(run)
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"killed after step {kill_after}: {diff}"
    assert [r["step"] for r in _metrics(run)] == list(range(1, 49))


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data, tmp_path):
    run = tmp_path / "run"
    cmd, env = _cli("--config", "tiny", "--data", str(data), "--out", str(run), "train.max_steps=100000",
                    "checkpoint.every_steps=0", "eval.every_steps=0", "train.log_every_steps=1000")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 5):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "interrupted (SIGTERM)" in out and "--resume" in out
    state = json.loads(next((run / "checkpoints").glob("step_*/state.json")).read_text())
    assert state["step"] == _metrics(run)[-1]["step"] >= 5
    assert state["reason"] == "interrupted by SIGTERM"


@pytest.mark.parametrize("lag", [0, 1])
def test_non_finite_losses_are_skipped_then_stop_with_a_checkpoint(data, tmp_path, monkeypatch, lag):
    """Lag 0 (CPU): the run stops right after the third bad step. Lag 1 (CUDA's default, forced here): the step queued
    behind it is taken too (also bad here) and counted in the saved state."""
    import maskedlm.objective as objective
    import maskedlm.train as train_mod

    real = objective.masked_cross_entropy
    calls = {"n": 0}

    def poisoned(logits, targets, **kw):
        calls["n"] += 1
        value = real(logits, targets, **kw)
        return value * float("nan") if calls["n"] > 4 else value  # steps 1-2 fine (2 micro-batches each), then NaN

    monkeypatch.setattr(objective, "masked_cross_entropy", poisoned)
    monkeypatch.setattr(train_mod, "HOST_READ_LAG", lag)
    out = tmp_path / "run"
    with pytest.raises(UserError, match="3 steps in a row had a non-finite loss") as e:
        train("tiny", data, out, ["train.max_steps=50", "train.max_bad_steps=3", *QUIET[:2], "checkpoint.every_steps=2",
                               "checkpoint.keep=5"])
    last = 5 + lag
    assert "last at step 5" in str(e.value) and f"step_{last:07d}" in str(e.value)
    recs = _metrics(out)
    assert [r.get("skipped", False) for r in recs] == [False, False] + [True] * (3 + lag)
    state = json.loads((out / "checkpoints" / f"step_{last:07d}" / "state.json").read_text())
    assert state["skipped_steps"] == 3 + lag and state["bad_steps_in_row"] == 3 + lag
    # skipped on the device (fused AdamW's found_inf): weights, moments and step counts are those after step 2
    ck = out / "checkpoints"
    assert (ck / "step_0000002").is_dir()
    w2 = load_file(str(ck / "step_0000002" / "model.safetensors"))
    w5 = load_file(str(ck / f"step_{last:07d}" / "model.safetensors"))
    assert w2.keys() == w5.keys() and all(torch.equal(w2[k], w5[k]) for k in w2)
    o2 = read_checkpoint(ck / "step_0000002").optimizer_state["state"]
    o5 = read_checkpoint(ck / f"step_{last:07d}").optimizer_state["state"]
    assert o2 and o2.keys() == o5.keys() and all(
        o2[p].keys() == o5[p].keys() and all(torch.equal(o2[p][k], o5[p][k]) for k in o2[p]) for p in o2)


def test_reading_step_numbers_a_step_late_changes_nothing(data, tmp_path, monkeypatch):
    """On CUDA the loop reads each step's loss and norm one step late (so the host queues ahead); forcing that lag on
    CPU must give the same records, evaluations and checkpoints as reading at once."""
    import maskedlm.train as train_mod

    runs = {}
    for lag in (0, 1, 2):
        monkeypatch.setattr(train_mod, "HOST_READ_LAG", lag)
        out = tmp_path / f"lag{lag}"
        train("tiny", data, out, ["train.max_steps=7", "eval.every_steps=3", "checkpoint.every_steps=4",
                                  "train.log_every_steps=1000"])
        recs = [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in _metrics(out)]
        runs[lag] = (recs, sorted(p.name for p in (out / "checkpoints").glob("step_*")), _weights(out))
    recs0, cks0, w0 = runs[0]
    assert [r["step"] for r in recs0 if r.get("kind") != "eval"] == list(range(1, 8))
    assert [r["step"] for r in recs0 if r.get("kind") == "eval"] == [3, 6, 7]
    for lag in (1, 2):
        recs, cks, w = runs[lag]
        assert recs == recs0 and cks == cks0 == ["step_0000004", "step_0000007"]
        assert all(torch.equal(w[k], w0[k]) for k in w0)


def test_time_budget_ends_the_run_and_the_schedule_together(data, tmp_path):
    res = train("tiny", data, tmp_path / "run", ["train.max_minutes=0.04", "optim.warmup_steps=0", *QUIET])
    recs = _metrics(tmp_path / "run")
    lrs = [r["lr"] for r in recs]
    assert len(recs) >= 5 and 2.4 <= res["elapsed_s"] < 10
    assert all(x >= y for x, y in zip(lrs, lrs[1:]))  # linear decay by elapsed time
    assert lrs[-1] < 0.3 * lrs[0]


def test_a_second_train_or_a_resume_with_another_config_is_refused(data, tmp_path):
    run = tmp_path / "run"
    train("tiny", data, run, ["train.max_steps=2", *QUIET])
    with pytest.raises(UserError, match="already holds a run.*--resume"):
        train("tiny", data, run, ["train.max_steps=2", *QUIET])
    # the LR schedule (optim.lr, train.max_steps) may change on --resume, the recovery from a divergence; the rest not
    with pytest.raises(UserError, match=r"different config.*\(masking\.mask_rate: 0\.15 → 0\.2, model\.dropout: 0\.0 → 0\.1\)"):
        train("tiny", data, run, ["train.max_steps=4", "optim.lr=1e-3", "model.dropout=0.1", "masking.mask_rate=0.2",
                                  *QUIET], resume=True)


@pytest.mark.parametrize("over, msg", [
    (["model.max_positions=16"], "seq_len 32 but the model takes at most 16 positions"),
    (["model.vocab_size=50"], "vocab_size 45 but the model has 50"),
    (["train.max_steps=0"], "no training budget"),
    (["train.micro_batch_rows=5"], "divisible"),
    (["train.max_step=3"], "did you mean 'train.max_steps'"),
], ids=["positions-under-seq-len", "vocab-not-the-datas", "no-budget", "rows-not-divisible", "typo"])
def test_a_config_that_is_mistyped_or_does_not_fit_the_data_is_refused(data, tmp_path, over, msg):
    with pytest.raises(UserError, match=msg):
        train("tiny", data, tmp_path / "bad", ["train.max_steps=2", *QUIET, *over])


def test_a_dir_that_is_not_prepared_data_is_refused(tmp_path):
    with pytest.raises(UserError, match="not a prepared data dir"):
        train("tiny", tmp_path / "nodata", tmp_path / "bad", ["train.max_steps=2"])


def test_cli_reports_a_config_typo_in_one_line(data, tmp_path, capsys):
    from maskedlm.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--config", "tiny", "--data", str(data), "--out", str(tmp_path / "r"), "optim.lrr=1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("maskedlm: error: unknown config key 'optim.lrr'") and err.count("\n") == 1
    assert not (tmp_path / "r").exists()  # nothing written for a refused run


def test_init_from_a_hugging_face_dir_starts_from_its_weights(data, tmp_path):
    from maskedlm.interop import export

    first = tmp_path / "first"
    train("tiny", data, first, ["train.max_steps=5", *QUIET])
    export(first, tmp_path / "hf", verify=False)
    # An LR far below fp32 resolution: one step leaves every weight where the import put it (biases at 0 may move by
    # ~1e-30, hence the absolute tolerance).
    res = train("tiny", data, tmp_path / "second", ["train.max_steps=1", "optim.lr=1e-30", "optim.warmup_steps=0", *QUIET],
                init_from=tmp_path / "hf")
    assert res["step"] == 1
    a, b = _weights(first), _weights(tmp_path / "second")
    assert a.keys() == b.keys()
    for k in a:  # the HF config does not carry pad_vocab_multiple: compare the 45 true vocabulary rows
        x, y = (a[k][:45], b[k][:45]) if a[k].shape != b[k].shape else (a[k], b[k])
        torch.testing.assert_close(y, x, rtol=0, atol=1e-20)
    fresh = _weights_fresh(data, tmp_path)
    assert any(not torch.equal(fresh[k], a[k]) for k in a)  # the init really came from the HF dir


def _weights_fresh(data, tmp_path):
    train("tiny", data, tmp_path / "fresh", ["train.max_steps=1", "optim.lr=1e-30", "optim.warmup_steps=0", *QUIET])
    return _weights(tmp_path / "fresh")


def test_resuming_a_finished_run_changes_nothing(data, tmp_path):
    run = tmp_path / "run"
    train("tiny", data, run, ["train.max_tokens=1500", *QUIET])  # 512 tokens per step: 3 steps cover 1500
    before = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints" / "step_0000003").iterdir()}
    res = train(None, data, run, resume=True)
    assert res["step"] == 3
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints" / "step_0000003").iterdir()} == before


@pytest.mark.parametrize("budget, shown", [(["train.max_steps=6"], ["6/6 [", "step/s"]),
                                           (["train.max_tokens=3000"], ["3.07k/3.07k [", "tok/s"]),
                                           (["train.max_minutes=0.02"], ["/0.02 min ["])])
def test_on_a_terminal_one_bar_counts_the_budget_in_its_own_unit(data, tmp_path, capsys, monkeypatch, budget, shown):
    """6 steps; 3000 tokens → 6 steps of 512 = 3072 tokens; 1.2 s. No plain step lines while the bar shows."""
    import maskedlm.metrics as metrics

    monkeypatch.setattr(metrics, "_terminal_columns", lambda: 80)
    train("tiny", data, tmp_path / "run", [*budget, "train.log_every_steps=1", "eval.every_steps=0", "checkpoint.every_steps=0"])
    captured = capsys.readouterr()
    last = captured.err.replace("\r", "\n").strip().splitlines()[-1]
    assert all(w in last for w in shown) and "loss=" in last and "tok_s=" in last, last
    assert "<" in last  # tqdm's elapsed<remaining: the ETA
    assert "step 1: loss" not in captured.out
