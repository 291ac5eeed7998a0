"""Checkpoints: atomic save, verified load, keep-last-K, and the model of a run or checkpoint dir.

RUN_DIR/checkpoints/step_XXXXXXX/ holds model.safetensors, config.json, tokenizer.json, state.json and optimizer.pt;
it is built in a temporary directory and renamed into place (files.py), and `latest` names the newest. state.json
records each file's size and sha256, so damage is detected instead of half-loaded; nothing is ever unpickled.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import platform
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors
import tokenizers
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import maskedlm
from maskedlm.errors import UserError
from maskedlm.files import atomic_write_text, fsync_path, replace_dir

WEIGHTS, CONFIG, TOKENIZER, STATE, OPTIMIZER = "model.safetensors", "config.json", "tokenizer.json", "state.json", "optimizer.pt"
STEP_RE = re.compile(r"^step_(\d+)$")
_REPLACED_RE = re.compile(r"^\.step_\d+\.old-\d+$")  # a step dir that files.replace_dir had moved aside
FORMAT_VERSION = 1


class CheckpointError(UserError):
    """A checkpoint that cannot be trusted: missing files, wrong sizes or hashes, unreadable contents."""


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


# -- low-level writers (one place each, so tests can simulate a full disk; text goes through files.py) ---------------
def _write_weights(path: Path, tensors: dict) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_optimizer(path: Path, state: dict) -> None:
    # Our own file object: on a failed write (a full disk) the descriptor closes here, not when the exception's
    # frames are collected; an open file would keep the disk's space and its mount busy.
    with open(path, "wb") as f:
        torch.save(state, f)


def _refuse_non_finite(model_state: dict, ck_root: Path, step: int) -> None:
    """A diverged model is not saved: `latest` would point at weights that nothing can continue from."""
    bad = [k for k, v in model_state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        prev = read_latest_name(ck_root)
        kept = f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists"
        others = " and others" if len(bad) > 1 else ""
        raise CheckpointError(f"not saving step {step}: the weights are not finite ({bad[0]}{others}); {kept}; "
                              "lower optim.lr and continue with --resume")


def _file_record(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def library_versions() -> dict:
    return {
        "maskedlm": maskedlm.__version__, "torch": torch.__version__, "numpy": np.__version__,
        "safetensors": safetensors.__version__, "tokenizers": tokenizers.__version__,
        "python": platform.python_version(),
    }


def rng_state() -> dict:
    """Torch's global RNG states (dropout draws from them), as base64 so state.json stays plain JSON."""
    enc = lambda t: base64.b64encode(t.cpu().numpy().tobytes()).decode()  # noqa: E731
    out = {"cpu": enc(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [enc(s) for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict) -> None:
    dec = lambda s: torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())  # noqa: E731
    if "cpu" in state:
        torch.set_rng_state(dec(state["cpu"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([dec(s) for s in state["cuda"]])


# -- save ------------------------------------------------------------------------------------------------------------
def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module | dict,
    optimizer: torch.optim.Optimizer | dict | None,
    config: dict,
    tokenizer_json: str | Path | None,
    state: dict,
    keep: int = 2,
) -> Path:
    """Write step_XXXXXXX atomically, point `latest` at it, keep the last `keep`. Returns the checkpoint dir.

    model and optimizer: modules/optimizers, or their state dicts (train passes the unsharded ones of
    distributed.full_state_dicts).

    An OSError (disk full, permissions) removes the partial temporary directory and raises CheckpointError; the
    previous checkpoint and `latest` are untouched.
    """
    ck_root = Path(run_dir) / "checkpoints"
    name = step_dir_name(step)
    model_state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    _refuse_non_finite(model_state, ck_root, step)
    ck_root.mkdir(parents=True, exist_ok=True)
    final = ck_root / name
    # Named .tmp-* (not files.temp_dir_beside's pattern): remove_stale_tmp and runs of earlier versions know this one.
    tmp = ck_root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _write_step_dir(tmp, step, model_state, optimizer, config, tokenizer_json, state)
        # `final` exists when a resumed run reaches a step that a killed run had saved but not made `latest`
        replace_dir(tmp, final)
        fsync_path(ck_root)
        atomic_write_text(ck_root / "latest", name + "\n")
        fsync_path(ck_root)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch and safetensors wrap a full disk in their own types
        shutil.rmtree(tmp, ignore_errors=True)
        raise _save_failed(e, ck_root, name) from None
    prune(ck_root, keep)
    return final


def _write_step_dir(tmp: Path, step: int, model_state: dict, optimizer, config: dict, tokenizer_json, state: dict) -> None:
    """Every file of one checkpoint into `tmp`, state.json last (it records the others' sizes and hashes), synced."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    _write_weights(tmp / WEIGHTS, tensors)
    if optimizer is not None:
        _write_optimizer(tmp / OPTIMIZER, optimizer if isinstance(optimizer, dict) else optimizer.state_dict())
    atomic_write_text(tmp / CONFIG, json.dumps(config, indent=2))
    if tokenizer_json is not None:
        shutil.copyfile(tokenizer_json, tmp / TOKENIZER)
    files = {p.name: _file_record(p) for p in sorted(tmp.iterdir())}
    full_state = {"format_version": FORMAT_VERSION, "step": step, **state, "versions": library_versions(), "files": files}
    atomic_write_text(tmp / STATE, json.dumps(full_state, indent=2))
    for p in tmp.iterdir():
        fsync_path(p)
    fsync_path(tmp)


def _save_failed(e: BaseException, ck_root: Path, name: str) -> CheckpointError:
    """The one line for a save that failed: why (a full disk named as such) and what is still there."""
    # torch.save reports a full disk as "PytorchStreamWriter failed writing file ...": ask the disk itself
    full = (isinstance(e, OSError) and e.errno == errno.ENOSPC) or shutil.disk_usage(ck_root).free < (1 << 20)
    prev = read_latest_name(ck_root)
    kept = f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists"
    why = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).splitlines() or [type(e).__name__])[0]
    why = os.strerror(errno.ENOSPC) if full else why
    return CheckpointError(f"could not save checkpoint {name} in {ck_root}: {why}; {kept}. Free disk space, then "
                           "continue with --resume")


def step_dirs(ck_root: Path) -> list[tuple[int, Path]]:
    """Finished checkpoint dirs, oldest first (temporary and trash dirs are not listed)."""
    if not ck_root.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in ck_root.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))]
    return sorted(out)


def prune(ck_root: Path, keep: int) -> None:
    latest = read_latest_name(ck_root)
    dirs = step_dirs(ck_root)
    for _, p in dirs[: max(0, len(dirs) - keep)]:
        if p.name != latest:
            shutil.rmtree(p, ignore_errors=True)


def remove_stale_tmp(ck_root: Path) -> None:
    """Temporary dirs left by a process killed during a save: never loaded, safe to delete."""
    if ck_root.is_dir():
        for p in ck_root.iterdir():
            if p.name.startswith((".tmp-", ".trash-", ".latest.tmp-")) or _REPLACED_RE.match(p.name):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def read_latest_name(ck_root: Path) -> str | None:
    try:
        name = (Path(ck_root) / "latest").read_text().strip()
    except OSError:
        return None
    return name if STEP_RE.match(name) else None


# -- load ------------------------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    path: Path
    config: dict  # the full resolved Config as a dict
    state: dict  # state.json
    model_state: dict  # name -> tensor
    optimizer_state: dict | None


def read_checkpoint(path: str | Path, load_optimizer: bool = True, verify: bool = True) -> Checkpoint:
    """Read and verify one checkpoint dir; CheckpointError naming the file and what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = json.loads((path / STATE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no {STATE} (a save was interrupted?)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: {STATE} is unreadable ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("files"), dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"checkpoint {path}: {STATE} is not a maskedlm checkpoint state (damaged?)")
    files = state["files"]
    for name in (WEIGHTS, CONFIG) + ((OPTIMIZER,) if load_optimizer else ()):
        if name not in files or not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} lacks {name}")
    if verify:
        for name, rec in files.items():
            p = path / name
            if not p.is_file():
                raise CheckpointError(f"checkpoint {path} lacks {name}")
            if p.stat().st_size != rec["bytes"]:
                raise CheckpointError(
                    f"checkpoint {path}: {name} has {p.stat().st_size} bytes, expected {rec['bytes']} (truncated?)"
                )
            if _file_record(p)["sha256"] != rec["sha256"]:
                raise CheckpointError(f"checkpoint {path}: {name} does not match its sha256 in {STATE} (corrupted)")
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: {CONFIG} is unreadable ({e})") from None
    try:
        model_state = load_file(str(path / WEIGHTS))
    except Exception as e:  # safetensors raises its own error type on a bad header or short file
        raise CheckpointError(f"checkpoint {path}: {WEIGHTS} is unreadable ({e})") from None
    opt = None
    if load_optimizer:
        try:
            opt = torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"checkpoint {path}: {OPTIMIZER} is unreadable ({e})") from None
    return Checkpoint(path=path, config=config, state=state, model_state=model_state, optimizer_state=opt)


def checkpoint_candidates(run_dir: str | Path) -> list[Path]:
    """`latest` first, then every other finished checkpoint, newest first."""
    ck_root = Path(run_dir) / "checkpoints"
    latest = read_latest_name(ck_root)
    dirs = [p for _, p in reversed(step_dirs(ck_root))]
    if latest and (ck_root / latest).is_dir():
        dirs = [ck_root / latest] + [p for p in dirs if p.name != latest]
    return dirs


def load_for_resume(run_dir: str | Path, warn=print) -> Checkpoint | None:
    """The newest checkpoint that verifies; a damaged one is reported and the previous one used. None: no checkpoint."""
    problems = []
    for p in checkpoint_candidates(run_dir):
        try:
            ck = read_checkpoint(p)
        except CheckpointError as e:
            warn(f"warning: skipping damaged checkpoint: {e}")
            problems.append(str(e))
            continue
        return ck
    if problems:
        raise CheckpointError("no usable checkpoint in " + str(run_dir) + ": " + "; ".join(problems))
    return None
