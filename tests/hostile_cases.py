"""The cases of tests/hostile_campaign.py and the fixtures they share: what a new, careless or hostile user does with
every command. A case builds its own inputs in its own folder (case.dir) from the shared, read-only world (case.world)
and says what the right outcome is: "refuse" (one line, exit 2; accepted is SILENT WRONG), "ok", or "any".
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from hostile_campaign import SRC, ok

sys.path.insert(0, str(SRC))
TRAIN = ["--config", "tiny", "train.max_steps=2", "train.global_batch_rows=4", "train.micro_batch_rows=4",
         "train.precision=fp32", "eval.every_steps=0", "train.prefetch=false"]
FT = ["finetune.max_steps=2", "finetune.lr=1e-3", "finetune.batch_rows=8"]
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split()


class Case:
    def __init__(self, name, build, expect="refuse", msg=None, bad=None, why=None, check=None, timeout=150,
                 mutable=(), stdin=None):
        self.name, self.build, self.expect, self.msg, self.bad, self.why = name, build, expect, msg, bad, why
        self.check, self.timeout, self.mutable, self.stdin = check, timeout, list(mutable), stdin
        self.cleanup = []
        self.dir = self.world = None


# -- fixtures --------------------------------------------------------------------------------------------------------
def _lines(n: int, seed: int) -> list[str]:
    import random

    r = random.Random(seed)
    return [" ".join([r.choice(WORDS)] * r.randrange(4, 10)) for _ in range(n)]


def _csv(path: Path, rows, header="text,label") -> Path:
    path.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def _jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def build_world(w: Path) -> None:
    """Corpora in every format, a tokenizer, data dirs, shard parts, two runs, an export, a fine-tuned model."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    (w / "corpus").mkdir(parents=True)
    lines = _lines(300, 0)
    (w / "corpus" / "a.txt").write_text("\n".join(lines) + "\n")
    (w / "corpus" / "b.txt").write_text("\n".join(_lines(300, 1)) + "\n")
    _jsonl(w / "c.jsonl", [{"text": x} for x in lines])
    (w / "c.jsonl.gz").write_bytes(gzip.compress((w / "c.jsonl").read_bytes()))
    (w / "c.txt.zst").write_bytes(zstandard.ZstdCompressor().compress("\n".join(lines).encode()))
    pq.write_table(pa.table({"text": lines}), w / "c.parquet")
    datasets.Dataset.from_dict({"text": lines}).save_to_disk(str(w / "arrow"))
    ok("tokenizer", "train", "--input", w / "corpus", "--vocab-size", 120, "--out", w / "tok")
    prep = ["--tokenizer", w / "tok", "--seq-len", 32, "--doc-per", "line", "--workers", 1, "--val-fraction", 0.1]
    ok("prepare", "--input", w / "corpus", *prep, "--out", w / "data")
    ok("prepare", "--input", w / "c.jsonl", *prep, "--out", w / "data2")
    for i in range(2):
        ok("prepare", "--input", w / "corpus", *prep, "--shard", f"{i}/2", "--out", w / f"part{i}")
    ok("train", "--data", w / "data", "--out", w / "run", *TRAIN)
    ok("train", "--data", w / "data", "--out", w / "run_eval", *TRAIN, "eval.every_steps=1")
    ok("export", w / "run", "--out", w / "hf")
    half = len(WORDS) // 2
    rows = [(x, "a" if x.split()[0] in WORDS[:half] else "b") for x in lines]
    _csv(w / "cls_train.csv", rows[:80])
    _csv(w / "cls_eval.csv", rows[80:110])
    _csv(w / "reg_train.csv", [(x, WORDS.index(x.split()[0]) / 3) for x in lines[:80]])
    _csv(w / "reg_eval.csv", [(x, WORDS.index(x.split()[0]) / 3) for x in lines[80:110]])
    tags = [{"tokens": x.split(), "tags": ["B-A" if i == 0 else "I-A" for i in range(len(x.split()))]
             if x.split()[0] in WORDS[:half] else ["O"] * len(x.split())} for x in lines]
    _jsonl(w / "tok_train.jsonl", tags[:80])
    _jsonl(w / "tok_eval.jsonl", tags[80:110])
    (w / "task").mkdir()
    shutil.copy(w / "cls_train.csv", w / "task" / "train.csv")
    shutil.copy(w / "cls_eval.csv", w / "task" / "eval.csv")
    ok("finetune", w / "run", "--train", w / "cls_train.csv", "--eval", w / "cls_eval.csv", "--out", w / "ft", *FT)


# -- helpers for a case's own inputs ---------------------------------------------------------------------------------
def W(c, *p) -> Path:
    return c.world.joinpath(*p)


def cp(c, name: str, dst: str | None = None) -> Path:
    src, dst = W(c, name), c.dir / (dst or name)
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


def mine(c, name="mine", subdirs=(), files=("notes.txt",)) -> Path:
    """A folder of the user's own files (protected: any change is FILES LOST)."""
    d = c.dir / name
    d.mkdir(parents=True, exist_ok=True)
    for f in files:
        (d / f).write_text(f"the user's {f}\n")
    for s in subdirs:
        (d / s).mkdir()
        (d / s / "keep.txt").write_text("the user's file\n")
    return d


def fifo(c, name="pipe") -> Path:
    p = c.dir / name
    os.mkfifo(p)
    return p


def text(c, name: str, content, mode="w") -> Path:
    p = c.dir / name
    p.parent.mkdir(parents=True, exist_ok=True)
    (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)
    return p


def mount(c, name: str, kib: int = 4, ro: bool = False) -> Path:
    """A tmpfs of `kib` KiB at case.dir/name (read-only with `ro`): a full or unwritable disk; unmounted after."""
    p = c.dir / name
    p.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k" + (",ro" if ro else ""), "tmpfs", str(p)],
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"cannot mount a tmpfs: {r.stderr.strip()}")
    c.cleanup.append(lambda: subprocess.run(["umount", "-l", str(p)], check=False))
    return p


def loop_dir(c) -> Path:
    """A folder with text and two symlinks back to itself: a walk that follows links never ends."""
    d = c.dir / "looped"
    d.mkdir()
    shutil.copy(W(c, "corpus", "a.txt"), d / "a.txt")
    os.symlink(d, d / "self1")
    os.symlink(d, d / "self2")
    return d


def edit_json(path: Path, change) -> Path:
    data = json.loads(path.read_text())
    new = change(data)
    path.write_text(json.dumps(data if new is None else new))
    return path


def latest(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def no_text(needle: str, where: str = "out"):
    """A check: `needle` must not appear in the case's output file `where` (or stdout)."""
    def check(c, res):
        body = (c.dir / where).read_text(errors="replace") if (c.dir / where).is_file() else res.stdout
        return f"{where} contains {needle!r}" if needle in body else None
    return check


def zst(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


def all_cases() -> list[Case]:
    import hostile_cases_data as d
    import hostile_cases_models as m

    cases = [*d.tokenizer_cases(), *d.prepare_cases(), *d.masks_cases(), *d.train_cases(), *m.eval_cases(),
             *m.report_cases(), *m.inference_cases(), *m.finetune_cases(), *m.export_import_cases(),
             *m.demo_cli_cases()]
    names = [c.name for c in cases]
    assert len(set(names)) == len(names), [n for n in names if names.count(n) > 1]
    return cases
