"""Checkpoints: round trip, keep-last-K, and every way a save or a file can go wrong leaving the previous one usable."""

import errno
import json

import pytest
import torch
from train_data import make_data

from maskedlm import checkpoint as ckpt
from maskedlm import files
from maskedlm.config import load_config
from maskedlm.errors import UserError
from maskedlm.model import MaskedLM
from maskedlm.models import load_checkpoint_model
from maskedlm.optim import build_optimizer


def _model_and_opt(seed=0):
    cfg = load_config("tiny", ["model.vocab_size=45", "train.max_steps=1"])
    model = MaskedLM(cfg.model)
    model.init_weights(seed)
    opt = build_optimizer(model, cfg.optim)
    ids = torch.randint(5, 45, (2, 16), generator=torch.Generator().manual_seed(seed))
    model(ids, positions=torch.tensor([[1, 2], [3, 4]])).sum().backward()
    opt.step()
    return cfg, model, opt


def _save(run, step, model, opt, cfg, keep=2):
    return ckpt.save_checkpoint(run, step, model, opt, cfg.to_dict(), None, {"tokens": step, "loader": {"position": step}}, keep=keep)


def test_round_trip_and_keep_last_k(tmp_path):
    cfg, model, opt = _model_and_opt()
    for step in (10, 20, 30):
        with torch.no_grad():
            model.head.bias.add_(1.0)  # each checkpoint holds different weights
        _save(tmp_path, step, model, opt, cfg, keep=2)
    root = tmp_path / "checkpoints"
    assert [p.name for _, p in ckpt.step_dirs(root)] == ["step_0000020", "step_0000030"]
    assert (root / "latest").read_text().strip() == "step_0000030"
    ck = ckpt.read_checkpoint(root / "step_0000030")
    for k, v in model.state_dict().items():
        assert torch.equal(ck.model_state[k], v), k
    assert ck.state["step"] == 30 and ck.state["loader"] == {"position": 30}
    assert "torch" in ck.state["versions"]
    ref = opt.state_dict()
    for pid, st in ref["state"].items():
        for name, t in st.items():
            assert torch.equal(ck.optimizer_state["state"][pid][name], t), (pid, name)
    loaded, lcfg, tok = load_checkpoint_model(tmp_path)
    assert lcfg == cfg and tok is None
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def _truncate(path, keep_bytes=100):
    data = path.read_bytes()
    path.write_bytes(data[:keep_bytes])


@pytest.mark.parametrize("damage", ["truncate-weights", "flip-byte-weights", "truncate-state", "missing-optimizer"])
def test_damaged_latest_falls_back_to_the_previous_on_resume(tmp_path, damage):
    cfg, model, opt = _model_and_opt()
    _save(tmp_path, 10, model, opt, cfg)
    with torch.no_grad():
        model.head.bias.add_(1.0)
    _save(tmp_path, 20, model, opt, cfg)
    d = tmp_path / "checkpoints" / "step_0000020"
    if damage == "truncate-weights":
        _truncate(d / "model.safetensors")
    elif damage == "flip-byte-weights":
        b = bytearray((d / "model.safetensors").read_bytes())
        b[-5] ^= 0xFF
        (d / "model.safetensors").write_bytes(bytes(b))
    elif damage == "truncate-state":
        _truncate(d / "state.json", 50)
    else:
        (d / "optimizer.pt").unlink()
    warnings = []
    ck = ckpt.load_for_resume(tmp_path, warn=warnings.append)
    assert ck.state["step"] == 10
    assert warnings and "step_0000020" in warnings[0]
    # inference does not silently use older weights: the error names the checkpoint that does load
    if damage != "missing-optimizer":  # weights-only loading does not need optimizer.pt
        with pytest.raises(UserError, match="step_0000010 loads"):
            load_checkpoint_model(tmp_path)


def test_kill_during_save_leaves_previous_loadable(tmp_path):
    cfg, model, opt = _model_and_opt()
    _save(tmp_path, 10, model, opt, cfg)
    root = tmp_path / "checkpoints"
    # What SIGKILL in the middle of a save leaves: a half-written temporary dir (and no rename, no `latest` update).
    tmp = root / ".tmp-step_0000020-99999"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"\x00" * 10)
    # ... or a step dir renamed into place whose `latest` never moved, with a truncated file
    (root / "step_0000030").mkdir()
    (root / "step_0000030" / "state.json").write_text('{"step": 30, "files"')
    assert ckpt.read_latest_name(root) == "step_0000010"
    model2, _, _ = load_checkpoint_model(tmp_path)
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in model.state_dict().items())
    ck = ckpt.load_for_resume(tmp_path, warn=lambda m: None)
    assert ck.state["step"] == 10
    ckpt.remove_stale_tmp(root)
    assert not tmp.exists()


@pytest.mark.parametrize("writer", ["_write_weights", "_write_optimizer", "files._write_text"])
def test_disk_full_during_save_raises_and_keeps_previous(tmp_path, monkeypatch, writer):
    cfg, model, opt = _model_and_opt()
    _save(tmp_path, 10, model, opt, cfg)

    def full(path, content):
        path.write_bytes(b"\x00" * 7)  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    # the writers of weights and optimizer state, and the one text writer (config.json, state.json) in files.py
    module, name = (files, writer.split(".")[1]) if writer.startswith("files.") else (ckpt, writer)
    monkeypatch.setattr(module, name, full)
    with pytest.raises(ckpt.CheckpointError) as e:
        _save(tmp_path, 20, model, opt, cfg)
    msg = str(e.value)
    assert "No space left on device" in msg and "step_0000010 is intact" in msg
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000010"]  # no partial dir left
    assert ckpt.load_for_resume(tmp_path).state["step"] == 10


def test_optimizer_file_is_not_unpickled(tmp_path):
    """optimizer.pt is loaded with weights_only=True: a pickle of an arbitrary object is refused, not executed."""
    cfg, model, opt = _model_and_opt()
    d = _save(tmp_path, 10, model, opt, cfg)
    torch.save({"state": {}, "param_groups": [], "payload": _Evil()}, d / "optimizer.pt")
    state = json.loads((d / "state.json").read_text())
    state["files"]["optimizer.pt"] = ckpt._file_record(d / "optimizer.pt")  # make the manifest agree
    (d / "state.json").write_text(json.dumps(state))
    _Evil.ran = False
    with pytest.raises(ckpt.CheckpointError, match="optimizer.pt is unreadable"):
        ckpt.read_checkpoint(d)
    assert not _Evil.ran


class _Evil:
    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Evil.ran = True
    return None


def test_a_missing_dir_and_a_run_without_checkpoints_are_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint_model(tmp_path / "nope")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="no checkpoint yet"):
        load_checkpoint_model(tmp_path / "run")


def test_a_run_dir_without_a_checkpoint_yet_is_named_as_such_as_model(tmp_path, capsys):
    """What `train` leaves when killed before its first save (config.json, command.txt, metrics.jsonl; no
    checkpoints/), or with checkpoints/ still empty, given as MODEL: one line saying so and what to do, exit 2, for
    every command that takes MODEL; not transformers' "unsupported model_type" (config.json is not Hugging Face's)."""
    from maskedlm.cli import main
    from maskedlm.models import load_any_model

    data = make_data(tmp_path / "data", rows=16, val_rows=4, seq_len=16)
    cfg, model, opt = _model_and_opt()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))  # as train's _start_run writes it
    (run / "command.txt").write_text("maskedlm train ...\n")
    (run / "metrics.jsonl").write_text("")
    commands = [["eval", str(run), "--data", str(data)], ["fill", str(run), "a [MASK]"], ["score", str(run), "a"],
                ["explain", str(run), "a b", "--mask", "1"], ["export", str(run), "--out", str(tmp_path / "x")],
                ["finetune", str(run), "--train", "t.csv", "--eval", "e.csv", "--out", str(tmp_path / "f")],
                ["train", "--init-from", str(run), "--data", str(data), "--out", str(tmp_path / "r2"), "train.max_steps=1"]]
    for empty_checkpoints in (False, True):
        if empty_checkpoints:
            (run / "checkpoints").mkdir()
        with pytest.raises(UserError, match="no checkpoint yet"):
            load_any_model(run)
        for argv in commands:
            with pytest.raises(SystemExit) as e:
                main(argv)
            err = capsys.readouterr().err
            assert e.value.code == 2 and err.count("\n") == 1, (argv, err)
            assert err.startswith(f"maskedlm: error: run dir {run} has no checkpoint yet") and "wait for the first save" in err
        assert not any((tmp_path / n).exists() for n in ("x", "f", "r2"))
    _save(run, 1, model, opt, cfg)  # the first save: the same dir is a MODEL now
    assert torch.equal(load_any_model(run)[0].state_dict()["encoder.tok_embeddings.weight"],
                       model.state_dict()["encoder.tok_embeddings.weight"])
