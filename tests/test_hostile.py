"""Hostile input to every command: each bad case ends with exit status 2 and one line on stderr, and no file that
existed before changes (sha256 of every file under the test's root, before and after). References: the files' own
bytes, and the exit status and line format that cli.py documents."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from inference_data import write_corpus

from maskedlm.cli import main
from maskedlm.files import lock_dir

TRAIN = ["--config", "tiny", "train.max_steps=2", "train.global_batch_rows=4", "train.micro_batch_rows=4",
         "train.precision=fp32", "eval.every_steps=0", "train.prefetch=false"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A corpus, its tokenizer, prepared data, a two-step run and its export: what a user has and must not lose."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "corpus").mkdir()
    write_corpus(root / "corpus" / "a.txt", lines=300)
    _ok(["tokenizer", "train", "--input", str(root / "corpus"), "--vocab-size", "120", "--out", str(root / "tok")])
    _ok(["prepare", "--input", str(root / "corpus"), "--tokenizer", str(root / "tok"), "--seq-len", "32", "--out",
         str(root / "data"), "--doc-per", "line", "--workers", "1", "--val-fraction", "0.1"])
    _ok(["train", "--data", str(root / "data"), "--out", str(root / "run"), *TRAIN])
    _ok(["export", str(root / "run"), "--out", str(root / "hf")])
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("someone's notes")
    (root / "a-file").write_text("not a directory")
    return root


def _ok(argv):
    try:
        main(argv)
    except SystemExit as e:  # train ends with dist.end_process(0) only under torchrun; elsewhere it returns
        assert e.code in (0, None), argv


def _snapshot(root: Path) -> dict:
    """sha256 of every file under `root`; directories as "dir", so an empty folder left behind shows too."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir" for p in sorted(root.rglob("*"))}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _bad_meta(w, t, change):
    d = _copy(w / "data", t / "data2")
    meta = json.loads((d / "meta.json").read_text())
    change(meta)
    (d / "meta.json").write_text(json.dumps(meta))
    return d


def _high_ids(w, t):
    d = _copy(w / "data", t / "data2")
    p = d / "train" / "shard_00000.ids.npy"
    ids = np.load(p)
    ids[0, 1] = json.loads((d / "meta.json").read_text())["vocab_size"] + 7  # same size, an id past the vocabulary
    np.save(p, ids)
    return d


def _object_counts(w, t):
    d = _copy(w / "data", t / "data2")
    np.save(d / "token_counts.npy", np.array([{"a": 1}, 2], dtype=object), allow_pickle=True)
    return d


def _nested_jsonl(t):
    p = t / "deep.jsonl"
    p.write_text('{"text": "ka lo"}\n' + "[" * 5000 + "]" * 5000 + "\n")
    return p


def _fifo(t):
    p = t / "pipe.txt"
    os.mkfifo(p)
    return p


def _state_list(w, t):
    run = _copy(w / "run", t / "run2")
    latest = (run / "checkpoints" / "latest").read_text().strip()
    (run / "checkpoints" / latest / "state.json").write_text("[]")
    return run


def _hf_config(w, t, **change):
    d = _copy(w / "hf", t / "hf2")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _hf_wrong_width(w, t):
    return _hf_config(w, t, hidden_size=128)


# id: (argv builder (world, case dir), part of the one error line)
CASES = {
    # 1: --out is an input, or an unrelated folder, even with --overwrite
    "1 export over its own run": (lambda w, t: ["export", str(_copy(w / "run", t / "r2")), "--out", str(t / "r2"),
                                                "--overwrite"], "is the input"),
    "1 import over its source": (lambda w, t: ["import", str(w / "hf"), "--out", str(w / "hf"), "--overwrite"],
                                 "is the input"),
    "1 export over someone's folder": (lambda w, t: ["export", str(w / "run"), "--out", str(w / "mine"), "--overwrite"],
                                       "holds no export; refusing"),
    "1 import over someone's folder": (lambda w, t: ["import", str(w / "hf"), "--out", str(w / "mine"), "--overwrite"],
                                       "holds no run; refusing"),
    "1 train into its data": (lambda w, t: ["train", "--data", str(w / "data"), "--out", str(w / "data" / "run"), *TRAIN],
                              "lies inside the input"),
    # 2: a second writer on a run dir that another process holds
    "2 run dir locked": (lambda w, t: ["train", "--data", str(w / "data"), "--out", str(w / "run"), "--resume", *TRAIN],
                         f"in use by another maskedlm process (pid {os.getpid()})"),
    # 3: an existing tokenizer is not replaced silently
    "3 tokenizer exists": (lambda w, t: ["tokenizer", "train", "--input", str(w / "corpus"), "--vocab-size", "60",
                                         "--out", str(w / "tok")], "already holds a tokenizer; pass --overwrite"),
    # 4: an output inside the input would be read back as text
    "4 prepare out inside input": (lambda w, t: ["prepare", "--input", str(w / "corpus"), "--tokenizer", str(w / "tok"),
                                                 "--out", str(w / "corpus" / "data"), "--overwrite"],
                                   "lies inside the input"),
    # 5: non-finite floats are refused before anything is written
    "5 lr inf": (lambda w, t: ["train", "--data", str(w / "data"), "--out", str(t / "new"), *TRAIN, "optim.lr=inf"],
                 "optim.lr must be a finite number, got inf"),
    "5 layer_norm_eps nan": (lambda w, t: ["train", "--data", str(w / "data"), "--out", str(t / "new"), *TRAIN,
                                           "model.layer_norm_eps=nan"], "model.layer_norm_eps must be a finite number"),
    "5 initializer_range nan": (lambda w, t: ["train", "--data", str(w / "data"), "--out", str(t / "new"), *TRAIN,
                                              "model.initializer_range=nan"], "model.initializer_range must be a finite"),
    # 6: sizes checked before memory is allocated
    "6 vocab 1e9": (lambda w, t: ["tokenizer", "train", "--input", str(w / "corpus"), "--vocab-size", "1000000000",
                                  "--out", str(t / "tok")], "is larger than maskedlm trains"),
    "6 hidden 1e7": (lambda w, t: ["train", "--data", str(w / "data"), "--out", str(t / "new"), *TRAIN,
                                   "model.hidden=10000000", "model.heads=1", "model.intermediate=4"], "needs about"),
    "6 layers 1e5": (lambda w, t: ["train", "--data", str(w / "data"), "--out", str(t / "new"), *TRAIN,
                                   "model.layers=10000000"], "needs about"),
    "6 import config of 10M hidden": (lambda w, t: ["import", str(_hf_config(w, t, hidden_size=10_000_000)), "--out",
                                                    str(t / "imp")], "needs about"),
    "6 config against weights": (lambda w, t: ["import", str(_hf_wrong_width(w, t)), "--out", str(t / "imp")],
                                 "the weights do not fit the config"),
    # 9: one line for every malformed input
    "9 tokenizer out is a file": (lambda w, t: ["tokenizer", "train", "--input", str(w / "corpus"), "--out",
                                                str(w / "a-file")], "is a file"),
    "9 train out under a file": (lambda w, t: ["train", "--data", str(w / "data"), "--out", str(w / "a-file" / "run"),
                                               *TRAIN], "which is a file"),
    "9 export out is a file": (lambda w, t: ["export", str(w / "run"), "--out", str(w / "a-file")], "is a file"),
    "9 json nested 5000 deep": (lambda w, t: ["prepare", "--input", str(_nested_jsonl(t)), "--tokenizer", str(w / "tok"),
                                              "--out", str(t / "d")], "nested too deep"),
    "9 meta vocab_size lots": (lambda w, t: ["eval", str(w / "run"), "--data",
                                             str(_bad_meta(w, t, lambda m: m.update(vocab_size="lots")))],
                               "malformed field"),
    "9 meta without mask id": (lambda w, t: ["eval", str(w / "run"), "--data",
                                             str(_bad_meta(w, t, lambda m: m["special_ids"].pop("mask")))],
                               "malformed field"),
    "9 optim.eps -1": (lambda w, t: ["train", "--data", str(w / "data"), "--out", str(t / "new"), *TRAIN, "optim.eps=-1"],
                       "optim.eps must be > 0"),
    "9 train.seed -1": (lambda w, t: ["train", "--data", str(w / "data"), "--out", str(t / "new"), *TRAIN,
                                      "train.seed=-1"], "train.seed must be an integer in [0, 2^63)"),
    "9 ids beyond vocabulary (eval)": (lambda w, t: ["eval", str(w / "run"), "--data", str(_high_ids(w, t)),
                                                     "--split", "train"], "beyond the vocabulary"),
    "9 ids beyond vocabulary (train)": (lambda w, t: ["train", "--data", str(_high_ids(w, t)), "--out", str(t / "new"),
                                                      *TRAIN], "beyond the vocabulary"),
    "9 object token_counts": (lambda w, t: ["train", "--data", str(_object_counts(w, t)), "--out", str(t / "new"),
                                            *TRAIN, "masking.random_token_dist=unigram"], "token_counts.npy"),
    "9 state.json is a list": (lambda w, t: ["fill", str(_state_list(w, t)), "golf golf [MASK]"],
                               "is not a maskedlm checkpoint state"),
    # 10: limits and small things
    "10 masking.seed 2^64": (lambda w, t: ["masks", str(w / "data"), "masking.seed=18446744073709551616"],
                             "masking.seed must be an integer in [0, 2^63)"),
    "10 fifo input": (lambda w, t: ["tokenizer", "train", "--input", str(_fifo(t)), "--out", str(t / "tok")],
                      "is not a regular file or directory"),
    "10 masks rows -1": (lambda w, t: ["masks", str(w / "data"), "--rows", "-1"], "--rows must be >= 0, got -1"),
    "10 masks step -5": (lambda w, t: ["masks", str(w / "data"), "--step", "-5"], "--step must be >= 0, got -5"),
    "10 argparse error": (lambda w, t: ["train", "--data", str(w / "data"), "--out", str(t / "r"), "--bogus"], "unrecognized arguments: --bogus"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_nothing_changes(world, tmp_path, capsys, case, one_thread):
    make_argv, message = CASES[case]
    argv = make_argv(world, tmp_path)  # planted files first: they belong to the "before"
    before = {**_snapshot(world), **_snapshot(tmp_path)}
    lock = lock_dir(world / "run") if case.startswith("2 ") else None
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as e:
            main(argv)
    finally:
        if lock is not None:
            lock.release()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert e.value.code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("maskedlm: error: "), err
    assert message in lines[0], lines[0]
    after = {**_snapshot(world), **_snapshot(tmp_path)}
    assert after == before  # no file changed, none appeared, none vanished


def test_non_utf8_text_is_read_with_replacement(world, capsys):
    """8: bytes that are not UTF-8 in TEXT (as the shell hands them to Python) are decoded with U+FFFD, said once."""
    text = os.fsdecode(b"golf \xff golf [MASK]")
    for argv in (["fill", str(world / "run"), text], ["score", str(world / "run"), text],
                 ["explain", str(world / "run"), text, "--mask", "golf"]):
        main(argv)
        err = capsys.readouterr().err
        assert "Traceback" not in err and "not valid UTF-8" in err, err


def test_text_from_stdin(world, capsys, monkeypatch):
    """10: TEXT `-` is read from standard input, for texts longer than the OS's argument limit."""
    import io

    main(["fill", str(world / "run"), "golf golf [MASK] golf", "--json"])
    direct = json.loads(capsys.readouterr().out)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"golf golf [MASK] golf")))
    main(["fill", str(world / "run"), "-", "--json"])
    assert json.loads(capsys.readouterr().out) == direct


def test_full_disk_is_one_line(world, tmp_path, capsys, monkeypatch):
    """7: ENOSPC while writing a tokenizer, and a safetensors error while saving a checkpoint: one line each, the
    temporary files removed, the previous output intact."""
    from safetensors import SafetensorError

    from maskedlm import checkpoint, files

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "tok.json")

    monkeypatch.setattr(files, "_write_text", full)
    with pytest.raises(SystemExit) as e:
        main(["tokenizer", "train", "--input", str(world / "corpus"), "--out", str(tmp_path / "tok")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "no space left on the device while writing tok.json" in err[0], err
    monkeypatch.undo()

    run = _copy(world / "run", tmp_path / "run")
    before = _snapshot(run)

    def full_weights(*_a, **_k):
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr(checkpoint, "_write_weights", full_weights)
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(world / "data"), "--out", str(run), "--resume", *TRAIN, "train.max_steps=3"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("maskedlm: error")]
    assert e.value.code == 2 and len(err) == 1 and "the previous checkpoint step_0000002 is intact" in err[0], err
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert {p: h for p, h in _snapshot(run).items() if "checkpoints" in p.parts} == \
        {p: h for p, h in before.items() if "checkpoints" in p.parts}


def test_resume_accepts_a_lower_lr_with_a_note(world, tmp_path, capsys, one_thread):
    """5: lowering optim.lr and resuming is the recovery from a divergence; other changes stay refused."""
    run = _copy(world / "run", tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(world / "data"), "--out", str(run), "--resume", *TRAIN, "train.max_steps=3",
              "model.hidden=32"])
    assert e.value.code == 2
    capsys.readouterr()
    _ok(["train", "--data", str(world / "data"), "--out", str(run), "--resume", *TRAIN, "train.max_steps=3",
         "optim.lr=0.0001"])
    out = capsys.readouterr().out
    assert "note: --resume with a changed optimizer schedule: optim.lr: 0.003 → 0.0001, train.max_steps: 2 → 3" in out, out
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000003"


def test_non_finite_weights_are_never_saved(world, tmp_path):
    """5: a checkpoint with NaN weights is refused; `latest` still names the previous one."""

    from maskedlm.checkpoint import CheckpointError, load_for_resume, save_checkpoint

    run = _copy(world / "run", tmp_path / "run")
    ck = load_for_resume(run)
    weights = dict(ck.model_state)
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name] = weights[name].clone().fill_(float("nan"))
    with pytest.raises(CheckpointError, match="not finite.*step_0000002 is intact"):
        save_checkpoint(run, 5, weights, None, ck.config, None, {})
    assert not (run / "checkpoints" / "step_0000005").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000002"


def test_resume_falls_back_past_a_state_json_that_is_a_list(world, tmp_path, capsys):
    """9: a damaged state.json is skipped like a truncated safetensors file: resume takes the previous checkpoint."""
    from maskedlm.checkpoint import load_for_resume, save_checkpoint

    run = _copy(world / "run", tmp_path / "run")
    ck = load_for_resume(run)
    save_checkpoint(run, 3, ck.model_state, ck.optimizer_state, ck.config, run / "checkpoints" / "step_0000002" /
                    "tokenizer.json", {k: v for k, v in ck.state.items() if k not in ("files", "step")})
    (run / "checkpoints" / "step_0000003" / "state.json").write_text("[]")
    got = load_for_resume(run, warn=lambda m: print(m, file=sys.stderr))
    assert got.path.name == "step_0000002"
    assert "skipping damaged checkpoint" in capsys.readouterr().err


def test_prepare_workers_are_capped(world, tmp_path, capsys, monkeypatch):
    """10: --workers 1000 does not start 1000 processes: at most 4 per core, and the user is told."""
    from maskedlm.data import prepare as prep

    seen = []
    real = prep.encoded_batches

    def spy(pieces, tok, workers, batch_chars):
        seen.append(workers)
        return real(pieces, tok, 1, batch_chars)  # the work itself in-process: the test is about the number

    monkeypatch.setattr(prep, "encoded_batches", spy)
    monkeypatch.setattr(prep, "_cores", lambda: 2)
    main(["prepare", "--input", str(world / "corpus"), "--tokenizer", str(world / "tok"), "--seq-len", "32", "--out",
          str(tmp_path / "data"), "--doc-per", "line", "--workers", "1000"])
    assert seen == [8]
    assert "--workers 1000 is more than 4 per core; using 8" in capsys.readouterr().err


def test_stale_prepare_temp_dirs_are_removed(world, tmp_path):
    """10: a kill -9 during prepare leaves .OUT.prepare-tmp-PID; the next run removes it when PID is gone."""
    stale = tmp_path / ".data.prepare-tmp-999999999"
    stale.mkdir()
    (stale / "x").write_text("half")
    main(["prepare", "--input", str(world / "corpus"), "--tokenizer", str(world / "tok"), "--seq-len", "32", "--out",
          str(tmp_path / "data"), "--doc-per", "line", "--workers", "1"])
    assert not stale.exists() and (tmp_path / "data" / "meta.json").is_file()


# ------------------------------------------------------------------------------------------------------- slow ones
def _maskedlm(*args, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "maskedlm", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_two_trains_on_one_run_dir(world, tmp_path):
    """2: a second writer is refused while the first holds the run dir (one line naming its pid); the first run
    ends intact, and resumes."""
    import time

    run = tmp_path / "run"
    long = [*TRAIN, "train.max_steps=100000000", "train.max_minutes=0.4", "checkpoint.every_steps=50"]
    first = _maskedlm("train", "--data", str(world / "data"), "--out", str(run), *long)
    deadline = time.time() + 120
    while not (run / "config.json").is_file() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, first.communicate()
    # the same config with --resume passes every check up to the lock; a fresh start is refused before it
    second = _maskedlm("train", "--data", str(world / "data"), "--out", str(run), "--resume", *long)
    third = _maskedlm("train", "--data", str(world / "data"), "--out", str(run), *TRAIN, "train.seed=1")
    for p, message in ((second, f"in use by another maskedlm process (pid {first.pid})"), (third, "already holds a run")):
        _, err = p.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and message in lines[0], err
    assert first.poll() is None  # the refusals came while the first run was still training
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert json.loads((run / "config.json").read_text())["train"]["seed"] == 0
    last = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "step" in json.loads(line)]
    assert steps == sorted(steps) and steps[-1] == last  # one run's records, in order, up to its checkpoint
    again = _maskedlm("train", "--data", str(world / "data"), "--out", str(run), "--resume", *long[:-2],
                      f"train.max_steps={last + 2}", "checkpoint.every_steps=50")
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{last + 2:07d}"


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_save(world, tmp_path, capsys, one_thread):
    """7: the run dir on a tmpfs too small for the next checkpoint: one line, the temporary folder removed, the
    previous checkpoint intact, and a resume elsewhere is bit-identical to a run that never hit the full disk."""
    reference = _copy(world / "run", tmp_path / "reference")
    _ok(["train", "--data", str(world / "data"), "--out", str(reference), "--resume", *TRAIN, "train.max_steps=4"])
    mnt = tmp_path / "small"
    mnt.mkdir()
    used = sum(p.stat().st_size for p in (world / "run").rglob("*") if p.is_file())
    ck = sum(p.stat().st_size for p in (world / "run" / "checkpoints" / "step_0000002").iterdir())
    size_kib = (used + ck // 2) // 1024 + 64 + 4 * len(list((world / "run").rglob("*")))  # a page per file too
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); needs root or CAP_SYS_ADMIN")
    try:
        run = _copy(world / "run", mnt / "run")
        before = {p: h for p, h in _snapshot(run).items() if "step_0000002" in p.parts}
        with pytest.raises(SystemExit) as e:
            main(["train", "--data", str(world / "data"), "--out", str(run), "--resume", *TRAIN, "train.max_steps=4"])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert e.value.code == 2 and len(err) == 1, err
        assert "No space left on device" in err[0] and "the previous checkpoint step_0000002 is intact" in err[0], err
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
        assert {p: h for p, h in _snapshot(run).items() if "step_0000002" in p.parts} == before
        assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000002"
        moved = _copy(run, tmp_path / "moved")
        held = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                if os.path.exists(f"/proc/self/fd/{fd}")]
        assert not [h for h in held if h.startswith(str(mnt))]  # no descriptor left open on the full disk
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)  # lazy: a failed assertion above may hold a file
    _ok(["train", "--data", str(world / "data"), "--out", str(moved), "--resume", *TRAIN, "train.max_steps=4"])
    a = (reference / "checkpoints" / "step_0000004" / "model.safetensors").read_bytes()
    b = (moved / "checkpoints" / "step_0000004" / "model.safetensors").read_bytes()
    assert a == b
