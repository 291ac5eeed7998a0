"""Issue 24's classes beyond one bad input: no hang (a FIFO output, a symlink loop under **), what a report leaves
out, damaged metrics lines, numbers near the float limit, long CSV cells, zstd frames, and every writer on a full or
read-only disk (slow). References: Python's glob, zstandard's own decompression, hand sums; the files' own bytes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from test_hostile import TRAIN, _copy, _fifo, _maskedlm, _ok, _written, make_world

from maskedlm.cli import main


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("hostile_more"))


def _looped(t: Path) -> Path:
    d = t / "looped"
    d.mkdir()
    (d / "a.txt").write_text("golf golf kilo\n" * 50)
    os.symlink(d, d / "self1")
    os.symlink(d, d / "self2")  # two links back: a walk that follows them branches at every level
    return d


HANGS = {  # 24: each ran until killed on the main of that day
    "report --out a FIFO": (lambda w, t: ["report", str(w / "run"), "--out", str(_fifo(t))], "is not a regular file"),
    "a ** glob over a symlink loop": (lambda w, t: ["tokenizer", "train", "--input", f"{_looped(t)}/**", "--vocab-size",
                                                    "60", "--out", str(t / "tok")], None),
}


@pytest.mark.parametrize("case", list(HANGS))
def test_no_hang(world, tmp_path, case):
    """24: a FIFO as an output and a symlink loop under a recursive glob end within seconds: one line, or done."""
    argv, message = HANGS[case][0](world, tmp_path), HANGS[case][1]
    p = _maskedlm(*argv, start_new_session=True)
    try:
        _, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        p.communicate()
        pytest.fail(f"{case}: still running after 120 s")
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith("maskedlm: note")]
    if message is None:
        assert p.returncode == 0 and (tmp_path / "tok" / "tokenizer.json").is_file(), err
    else:
        assert p.returncode == 2 and len(lines) == 1 and message in lines[0], err


def test_report_omits_what_a_run_did_not_measure(world, tmp_path):
    """24: a run without periodic evaluation has no eval columns in the final-numbers table, and no NaN anywhere
    (json.dumps writes NaN, which no JSON parser reads, into the page's data block)."""
    main(["report", str(world / "run"), "--out", str(tmp_path / "r.html")])
    page = (tmp_path / "r.html").read_text()
    data = page.split('id="report-data">')[1].split("</script>")[0].replace("<\\/", "</")
    def strict(name):  # Python's parser takes NaN and Infinity; JSON (and a browser's JSON.parse) does not
        raise ValueError(f"{name} is not JSON")

    final = json.loads(data, parse_constant=strict)["runs"][0]["final"]
    assert ">nan<" not in page
    assert "eval loss" not in final and final["step"] == 2


def test_damaged_metrics_lines_are_skipped_and_said(world, tmp_path, capsys, one_thread):
    """24: a non-JSON line and a wrongly typed one in metrics.jsonl (a crash, a disk, an edit): report skips them
    with a warning and --resume drops them; neither ends in a traceback."""
    run = _copy(world / "run", tmp_path / "run")
    good = (run / "metrics.jsonl").read_text()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": "x", "loss": []}\n{not json\n[1, 2]\n')
    main(["report", str(run), "--out", str(tmp_path / "r.html")])
    assert "skipped 3 damaged line(s)" in capsys.readouterr().err
    _ok(["train", "--data", str(world / "data"), "--out", str(run), "--resume", *TRAIN, "train.max_steps=3"])
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert lines[: len(good.splitlines())] == good.splitlines() and len(lines) == len(good.splitlines()) + 1
    assert json.loads(lines[-1])["step"] == 3


def test_weights_near_the_float_limit_are_shares(world):
    """24: data.weights=[1e308, 1e308] are equal shares (their sum overflowed to inf, the shares to 0)."""
    from maskedlm.data.shards import mixture_weights, open_data_dir

    d = open_data_dir(world / "data")
    assert mixture_weights([1e308, 1e308], [d, d]) == [0.5, 0.5]
    assert mixture_weights([3.0, 1.0], [d, d]) == [0.75, 0.25]


def test_a_csv_cell_over_128_kib_is_a_text(tmp_path):
    """24: csv's default field limit (131072 chars) ended in a traceback; a long document is a text like any other."""
    from maskedlm.tasks import get_task
    from maskedlm.tasks.read import read_examples

    long = "golf " * 40_000
    p = _written(tmp_path, "t.csv", f"text,label\n{long},a\nkilo,b\n")
    ex = read_examples(p, get_task("classify"), "text", None, "label")
    assert ex.texts == [long, "kilo"] and ex.labels == ["a", "b"]


def test_zstd_frames_are_all_read_and_a_cut_is_found(tmp_path):
    """24: two concatenated frames (`cat a.zst b.zst`) are read whole; a file cut anywhere inside a frame is refused.
    Reference: zstandard's own one-shot decompression of each frame."""
    import zstandard

    from maskedlm.data.corpus import iter_corpus_texts

    a, b = "golf kilo\n" * 300, "lima echo\n" * 200
    frames = zstandard.ZstdCompressor().compress(a.encode()) + zstandard.ZstdCompressor(write_checksum=True).compress(b.encode())
    whole = _written(tmp_path, "two.txt.zst", frames)
    assert "".join(t + "\n\n" for t in iter_corpus_texts([whole], doc_per="file")).strip() == (a + b).strip()
    for cut in (len(frames) - 1, len(frames) // 2, 7):
        p = _written(tmp_path, f"cut{cut}.txt.zst", frames[:cut])
        with pytest.raises(Exception, match="truncated or damaged"):
            list(iter_corpus_texts([p], doc_per="file"))


def _mount_tmpfs(mnt: Path, kib: int, ro: bool = False) -> None:
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k" + (",ro" if ro else ""), "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); needs root or CAP_SYS_ADMIN")


WRITERS = {  # 24: every command that writes, its output on a disk too small for it (out: where it goes)
    "tokenizer train": lambda w, out: ["tokenizer", "train", "--input", str(w / "corpus"), "--vocab-size", "120",
                                       "--out", str(out)],
    "prepare": lambda w, out: ["prepare", "--input", str(w / "corpus"), "--tokenizer", str(w / "tok"), "--seq-len", "32",
                               "--doc-per", "line", "--workers", "1", "--out", str(out)],
    "prepare --merge": lambda w, out: ["prepare", "--merge", str(out), str(w / "part0"), str(w / "part1")],
    "finetune": lambda w, out: ["finetune", str(w / "run"), "--train", str(w / "cls.csv"), "--eval", str(w / "cls.csv"),
                                "--out", str(out), "finetune.max_steps=2"],
    "finetune --probe": lambda w, out: ["finetune", str(w / "run"), "--train", str(w / "cls.csv"), "--eval",
                                        str(w / "cls.csv"), "--out", str(out), "--probe"],
    "export": lambda w, out: ["export", str(w / "run"), "--out", str(out)],
    "import": lambda w, out: ["import", str(w / "hf"), "--out", str(out)],
    "report": lambda w, out: ["report", str(w / "run"), "--out", str(out) + ".html"],
    "report --png": lambda w, out: ["report", str(w / "run"), "--out", str(out.parent.parent / "r.html"), "--png",
                                    str(out)],
}


@pytest.mark.slow
@pytest.mark.parametrize("full", [True, False], ids=["full disk", "read-only disk"])
@pytest.mark.parametrize("command", list(WRITERS))
def test_every_writer_on_a_full_or_read_only_disk(world, tmp_path, capsys, command, full, one_thread):
    """24 (7): the output on a tmpfs of one page, or a read-only one: one line (exit 2) naming the disk's refusal,
    nothing left behind on it (no temporary file or folder), no descriptor held open there."""
    mnt = tmp_path / "small"
    _mount_tmpfs(mnt, 4, ro=not full)
    try:
        with pytest.raises(SystemExit) as e:
            main(WRITERS[command](world, mnt / "out"))
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("maskedlm: error")]
        assert e.value.code == 2 and len(err) == 1, err
        assert ("no space left on" if full else "read-only file system") in err[0].lower(), err
        assert list(mnt.iterdir()) == []
        held = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                if os.path.exists(f"/proc/self/fd/{fd}")]
        assert not [h for h in held if h.startswith(str(mnt))]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_recursive_glob_matches_python_glob_without_links(tmp_path):
    """24: the ** walk that does not follow symlinked dirs finds what glob.glob(recursive=True) finds on a tree
    without links (hidden names left out by both), and ends on a tree with a loop."""
    import glob

    from maskedlm.data.corpus import _glob

    for p in ("a/b/c/x.txt", "a/y.txt", "z.txt", "a/.hidden/q.txt", "a/b/.h.txt", "d/e.jsonl"):
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_text("golf\n")
    for pattern in ("**", "**/*.txt", "a/**", "a/**/x.txt", "*/b/**", "?/**/*", "**/e.jsonl"):
        full = str(tmp_path / pattern)
        want = sorted(p.rstrip("/") for p in glob.glob(full, recursive=True))
        assert [p.rstrip("/") for p in _glob(full)] == want, pattern
    os.symlink(tmp_path / "a", tmp_path / "a" / "b" / "loop")
    assert str(tmp_path / "a" / "b" / "loop") in _glob(str(tmp_path / "**"))  # listed, not entered
    assert not [p for p in _glob(str(tmp_path / "**")) if "loop/" in p]
