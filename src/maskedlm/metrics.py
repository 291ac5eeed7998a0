"""Where training numbers go: RUN_DIR/metrics.jsonl, a tqdm progress bar, TensorBoard event files when installed.

Rank 0 gets a MetricsLogger; other ranks get NullLogger, which does nothing, so the loop never asks which rank it is.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from maskedlm.files import atomic_write_text


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the record readable by strict parsers
    return v


_COUNTS = ("step", "tokens")  # the integer fields of a record; every other number may be written as "nan"/"inf"
_NUMBERS = ("loss", "masked_acc", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "epoch")  # and val_*, probe/*
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def parse_record(line: str) -> dict | None:
    """One metrics.jsonl line as a record with its numbers typed, or None for a damaged line: not JSON (cut by a
    kill), not an object, a count that is not a non-negative integer, or a number field that holds no number."""
    try:
        rec = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("kind", "train"), str):
        return None
    for k, v in rec.items():
        if k in _COUNTS:
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                return None
        elif k in _NUMBERS or k.startswith(("val_", "probe/")) and not isinstance(v, (list, dict)):
            if isinstance(v, str) and v in _NON_FINITE:  # _clean wrote it so
                rec[k] = _NON_FINITE[v]
            elif not isinstance(v, (int, float)) or isinstance(v, bool):
                return None
    return rec


def read_metrics(path: Path, warn=None) -> list[dict]:
    """The records of a metrics.jsonl in file order; damaged lines are skipped and counted in one `warn` line."""
    records, bad = [], 0
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        rec = parse_record(line) if line.strip() else {}
        bad += rec is None
        if rec:
            records.append(rec)
    if bad and warn is not None:
        warn(f"skipped {bad} damaged line(s) of {path} (not a JSON record of numbers)")
    return records


def truncate_jsonl(path: Path, max_step: int, warn=None) -> None:
    """Drop records after `max_step` (a resumed run rewrites the steps a killed run had logged past its checkpoint),
    and damaged lines (a line cut by SIGKILL, a bad disk, an edit), counted in one `warn` line."""
    if not path.exists():
        return
    keep, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        rec = parse_record(line) if line.strip() else {}
        bad += rec is None
        if rec and rec.get("step", 0) <= max_step:
            keep.append(line)
    if bad and warn is not None:
        warn(f"dropped {bad} damaged line(s) of {path} (not a JSON record of numbers)")
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _terminal_columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns if sys.stderr.isatty() else 0
    except (OSError, ValueError, AttributeError):  # no fileno (captured), or not a terminal
        return 0


@dataclass(frozen=True)
class Budget:
    """What the progress bar counts towards: the unit the run's budget is given in ("step", "tok" or "min") and its
    total, so the bar's fraction and ETA are those of the budget that ends the run."""

    unit: str
    total: float | None


class MetricsLogger:
    def __init__(self, run_dir: str | Path, budget: Budget, start: float = 0.0, progress: bool | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = open(self.path, "a", buffering=1)
        # A bar on terminals only; elsewhere (CI, logs, a pty without a size) the loop prints a line every
        # log_every_steps instead.
        if progress is None:
            progress = _terminal_columns() > 0
        fmt = None
        if budget.unit == "min":  # fractional minutes: tqdm's default shows whole numbers
            fmt = "{l_bar}{bar}| {n:.2f}/{total:.2f} min [{elapsed}<{remaining}{postfix}]"
        self.bar = tqdm(total=budget.total, initial=start, disable=not progress, unit=budget.unit,
                        unit_scale=budget.unit == "tok", dynamic_ncols=True, file=sys.stderr, bar_format=fmt)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        except Exception:  # tensorboard not installed: JSONL and the bar are enough
            self.tb = None

    @property
    def bar_visible(self) -> bool:
        return not self.bar.disable

    def log(self, record: dict) -> None:
        self.file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        step = record.get("step", 0)
        if self.tb is not None:
            kind = record.get("kind", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "kind"):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def truncate(self, max_step: int) -> None:
        """Drop the records after `max_step` (a loss-spike rollback abandons them) and go on appending."""
        self.file.close()
        truncate_jsonl(self.path, max_step)
        self.file = open(self.path, "a", buffering=1)

    def progress(self, done: float, loss: float, lr: float, tokens_per_s: float) -> None:
        """Move the bar to `done` (in the budget's unit) and show the latest numbers beside it."""
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        self.bar.update(done - self.bar.n)

    def write(self, text: str) -> None:
        """A line above the bar (tqdm.write keeps the bar intact)."""
        self.bar.write(text, file=sys.stdout)
        sys.stdout.flush()

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class NullLogger:
    """For ranks other than 0: accepts everything, writes nothing."""

    bar_visible = False

    def log(self, record: dict) -> None:
        pass

    def truncate(self, max_step: int) -> None:
        pass

    def progress(self, *a, **k) -> None:
        pass

    def write(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class StepProgress:
    """Progress of a loop of known length (fine-tuning): a tqdm bar on a terminal; elsewhere a plain line every
    `every` steps and at each `note`, with the step, the numbers given and the ETA, so a redirected log shows life.
    `quiet` (ranks other than 0) shows nothing."""

    def __init__(self, total: int, label: str, every: int = 0, progress: bool | None = None, out=None, clock=None,
                 quiet: bool = False):
        self.total, self.label, self.done, self.quiet = total, label, 0, quiet
        self.every = every or max(1, total // 10)
        self.out = out or sys.stderr  # stdout is for results (finetune prints its JSON there)
        self.clock = clock or time.perf_counter
        self.t0 = self.clock()
        self.numbers: dict[str, str] = {}
        if progress is None:
            progress = _terminal_columns() > 0
        self.bar = tqdm(total=total, desc=label, disable=quiet or not progress, unit="step", dynamic_ncols=True, file=sys.stderr)

    def _line(self) -> str:
        elapsed = self.clock() - self.t0
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        shown = "".join(f", {k} {v}" for k, v in self.numbers.items())
        return f"{self.label}: step {self.done}/{self.total}{shown}, elapsed {_clock(elapsed)}, ETA {_clock(eta)}"

    def step(self, **numbers) -> None:
        """One step done; `numbers` (e.g. loss=0.53) are shown beside it."""
        self.numbers.update({k: f"{v:.4f}" if isinstance(v, float) else str(v) for k, v in numbers.items()})
        self.done += 1
        if not self.bar.disable:
            self.bar.set_postfix(self.numbers, refresh=False)
            self.bar.update(1)
        elif not self.quiet and self.done % self.every == 0 and self.done < self.total:
            print(self._line(), file=self.out, flush=True)

    def note(self, **numbers) -> None:
        """New numbers (an evaluation's) shown now: above the bar, or as a plain line."""
        self.numbers.update({k: f"{v:.4f}" if isinstance(v, float) else str(v) for k, v in numbers.items()})
        if self.quiet:
            return
        if self.bar.disable:
            print(self._line(), file=self.out, flush=True)
        else:
            self.bar.set_postfix(self.numbers, refresh=True)

    def close(self) -> None:
        self.bar.close()
