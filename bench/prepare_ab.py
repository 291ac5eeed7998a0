"""A/B of prepare.py versions (with their corpus.py, encode.py) and settings, in alternating child processes: CPU and wall time.

Not a peer benchmark (bench/prepare.py is): it compares maskedlm with itself, e.g. a commit before a change against
the working tree, on a shared machine where only same-round ratios mean anything. For example:
    python bench/prepare_ab.py --input corpus_5MB.txt --tokenizer tok --rounds 5 ad7c1f7 work work:par=false work:join=256
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = r"""
import importlib.util, json, os, sys, time
path, corpus_path, encode_path, inp, tok, out, batch, join = sys.argv[1:9]
def load(name, file):
    spec = importlib.util.spec_from_file_location(name, file)
    mod = sys.modules[name] = importlib.util.module_from_spec(spec)  # registered first: dataclasses look it up
    spec.loader.exec_module(mod)
    return mod
if corpus_path:  # before anything imports the working tree's corpus reader
    sys.modules["maskedlm.data.corpus"] = load("maskedlm.data.corpus", corpus_path)
if encode_path:  # the tokenizing layer, data/encode.py since it left prepare.py
    sys.modules["maskedlm.data.encode"] = load("maskedlm.data.encode", encode_path)
if path:
    m = load("prepare_ab_version", path)
else:
    import maskedlm.data.prepare as m
if int(batch): m.BATCH_CHARS = int(batch)
import maskedlm.data.encode as e
if int(join): (m if hasattr(m, "JOIN_TEXTS") else e).JOIN_TEXTS = int(join)
import numpy, tokenizers, tqdm  # imported before the clock starts, as in bench/prepare.py
c, t = time.process_time(), time.perf_counter()
m.prepare([inp], tok, 128, out, val_fraction=0.01, doc_per="line", workers=0, overwrite=True, progress=False)
print(json.dumps({"wall": time.perf_counter() - t, "cpu": time.process_time() - c}))
"""


def _file_at(rev: str, name: str, tmp: Path, required: bool) -> str:
    """src/maskedlm/data/`name` as of git revision `rev`, copied into `tmp`; "" when that revision lacks it."""
    got = subprocess.run(["git", "show", f"{rev}:src/maskedlm/data/{name}"], cwd=ROOT, capture_output=True, text=True)
    if got.returncode:
        if required:
            sys.exit(f"git show {rev}:src/maskedlm/data/{name} failed:\n{got.stderr}")
        return ""
    path = tmp / f"{Path(name).stem}_{rev}.py"
    path.write_text(got.stdout)
    return str(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+", help="REV[:par=false][:batch=N][:join=N]; REV a git revision or 'work'")
    p.add_argument("--input", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="prepare_ab_"))
    plans = []
    for v in a.variants:
        rev, *opts = v.split(":")
        kw = dict(o.split("=", 1) for o in opts)
        path = corpus_path = encode_path = ""
        if rev != "work":  # that revision's prepare.py (and corpus.py, encode.py where it has them), with the tree's others
            path = _file_at(rev, "prepare.py", tmp, required=True)
            corpus_path = _file_at(rev, "corpus.py", tmp, required=False)
            encode_path = _file_at(rev, "encode.py", tmp, required=False)
        env = dict(os.environ, TOKENIZERS_PARALLELISM=kw.get("par", "true"))
        plans.append((v, path, corpus_path, encode_path, env, kw.get("batch", "0"), kw.get("join", "0")))
    res: dict[str, list] = {v: [] for v, *_ in plans}
    for r in range(a.rounds):
        for v, path, corpus_path, encode_path, env, batch, join in plans:
            out = subprocess.run([sys.executable, "-c", CHILD, path, corpus_path, encode_path, a.input, a.tokenizer, str(tmp / "out"), batch, join],
                                 env=env, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{v} failed:\n{out.stderr}")
            x = __import__("json").loads(out.stdout.strip().splitlines()[-1])
            res[v].append((x["wall"], x["cpu"]))
            print(f"round {r} {v:28s} wall {x['wall']:6.2f} cpu {x['cpu']:6.2f} load {os.getloadavg()[0]:.1f}", flush=True)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    base = res[a.variants[0]]
    for v in a.variants:
        w, c = med([x[0] for x in res[v]]), med([x[1] for x in res[v]])
        wr, cr = med([b[0] / x[0] for b, x in zip(base, res[v])]), med([b[1] / x[1] for b, x in zip(base, res[v])])
        print(f"{v:28s} median wall {w:6.2f} cpu {c:6.2f} | vs {a.variants[0]}: wall {wr:.2f}x cpu {cr:.2f}x")


if __name__ == "__main__":
    main()
