"""A hostile campaign over every maskedlm command: 300+ cases, each a subprocess with a timeout, classified as ok,
refusal (one `maskedlm: error:` line, exit 2), TRACEBACK, HANG, FILES LOST, SILENT WRONG, MISLEADING or WRONG REFUSAL.
Not collected by pytest (no test_ prefix); run: `python tests/hostile_campaign.py --out DIR [--jobs 2] [--only TEXT]`.
The cases themselves live in hostile_cases.py; the fixtures (a tiny corpus, tokenizer, data, run) are built once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SRC = HERE.parent / "src"
ENV = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONFAULTHANDLER": "0"}
FAILURES = ("HANG", "FILES LOST", "TRACEBACK", "SILENT WRONG", "MISLEADING", "WRONG REFUSAL")


def maskedlm(*argv, timeout=300, stdin=None, cwd=None) -> subprocess.CompletedProcess:
    """`python -m maskedlm ARGV` with this checkout's sources; a timeout kills the whole process group."""
    p = subprocess.Popen([sys.executable, "-m", "maskedlm", *map(str, argv)], env=ENV, cwd=cwd, text=True,
                         stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = p.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        out, err = p.communicate()
        return subprocess.CompletedProcess(p.args, None, out, err)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def ok(*argv, **kw):
    r = maskedlm(*argv, **kw)
    if r.returncode != 0:
        raise SystemExit(f"fixture failed: maskedlm {' '.join(map(str, argv))}\n{r.stderr[-3000:]}")
    return r


def snapshot(root: Path, skip=()) -> dict:
    """sha256 of every file under `root` (links by their target), skipping paths under any of `skip`."""
    out = {}
    if not root.exists():
        return out
    for dirpath, dirs, files in os.walk(root):
        d = Path(dirpath)
        if any(d == s or s in d.parents for s in skip):
            dirs[:] = []
            continue
        for name in files:
            p = d / name
            if name == ".lock" or any(p == s or s in p.parents for s in skip):
                continue
            try:
                out[str(p)] = "fifo" if p.is_fifo() else hashlib.sha256(p.read_bytes()).hexdigest()
            except OSError:
                out[str(p)] = "unreadable"
    return out


def verdict(case, res, lost: list[str]) -> tuple[str, str]:
    """(class, detail) of one case's result."""
    if res.returncode is None:
        return "HANG", f"no exit within {case.timeout}s"
    if lost:
        return "FILES LOST", ", ".join(lost[:4])
    err = res.stderr or ""
    lines = [x for x in err.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("maskedlm: error:")]
    if "Traceback" in err or res.returncode not in (0, 2):
        tail = [x for x in lines if x.strip() and not x.startswith(" ")][-1:] or [f"exit {res.returncode}"]
        return "TRACEBACK", tail[0][:300]
    if res.returncode == 2:
        if len(errors) != 1 or lines[-1] != errors[0]:
            return "TRACEBACK", f"exit 2 without one error line: {lines[-3:]}"
        line = errors[0]
        said = line.replace(str(case.dir), "CASE").replace(str(case.world), "WORLD")  # a case's name is in its paths
        if case.expect == "ok":
            return "WRONG REFUSAL", line[:300]
        if case.msg and not re.search(case.msg, said):
            return "MISLEADING", f"wanted /{case.msg}/: {line[:300]}"
        if case.bad and re.search(case.bad, said):
            return "MISLEADING", f"says /{case.bad}/: {line[:300]}"
        return "refusal", line[:300]
    if case.expect == "refuse":
        return "SILENT WRONG", f"accepted; {case.why or 'should be refused'}"
    if case.check:
        wrong = case.check(case, res)
        if wrong:
            return "SILENT WRONG", wrong
    return "ok", ""


def run_case(i: int, case, world: Path, root: Path) -> dict:
    case.dir = root / f"{i:03d}-{re.sub(r'[^A-Za-z0-9]+', '-', case.name)[:60].strip('-')}"
    case.dir.mkdir(parents=True)
    case.world = world
    try:
        steps = case.build(case)
    except Exception as e:  # a case's own set-up: report it, never stop the campaign
        return {"i": i, "name": case.name, "class": "SETUP", "detail": repr(e)[:300], "argv": [], "s": 0}
    steps = steps if steps and isinstance(steps[0], list) else [steps]
    mutable = [case.dir / m for m in case.mutable]
    before = snapshot(case.dir, skip=mutable)
    start = time.time()
    for argv in steps:
        res = maskedlm(*argv, timeout=case.timeout, stdin=case.stdin, cwd=case.dir)
        if res.returncode != 0:
            break
    after = snapshot(case.dir, skip=mutable)
    lost = [os.path.relpath(p, case.dir) for p, h in before.items() if after.get(p) != h]
    klass, detail = verdict(case, res, lost)
    for f in case.cleanup:
        f()
    return {"i": i, "name": case.name, "class": klass, "detail": detail, "argv": [str(a) for a in steps[-1]],
            "s": round(time.time() - start, 1), "rc": res.returncode, "stderr": (res.stderr or "")[-2000:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", nargs="+", default=None, help="run the cases whose name contains one of these texts")
    ap.add_argument("--list", action="store_true", help="print the case names and stop")
    ap.add_argument("--src", type=Path, default=None,
                    help="run the cases against another checkout's src/ (e.g. `git archive main src`); fixtures too")
    a = ap.parse_args()
    if a.src is not None:
        ENV["PYTHONPATH"] = f"{a.src.resolve()}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    import hostile_cases

    cases = hostile_cases.all_cases()
    if a.list:
        print("\n".join(f"{c.name}  [{c.expect}]" for c in cases), f"\n{len(cases)} cases")
        return
    picked = [(i, c) for i, c in enumerate(cases) if not a.only or any(x in c.name for x in a.only)]
    world = a.out.resolve() / "world"
    if not (world / "done").is_file():
        shutil.rmtree(world, ignore_errors=True)
        t = time.time()
        hostile_cases.build_world(world)
        (world / "done").write_text("")
        print(f"fixtures built in {time.time() - t:.0f}s", flush=True)
    root = a.out.resolve() / f"cases-{time.strftime('%H%M%S')}"
    world_before = snapshot(world)
    results = []
    with ThreadPoolExecutor(a.jobs) as pool:
        for r in pool.map(lambda ic: run_case(ic[0], ic[1], world, root), picked):
            results.append(r)
            mark = "  " if r["class"] in ("ok", "refusal") else "!!"
            print(f"{mark} {r['i']:3d} {r['class']:<13} {r['s']:6.1f}s {r['name']}  {r['detail'][:160]}", flush=True)
    changed = [p for p, h in world_before.items() if snapshot(world).get(p) != h]
    if changed:
        results.append({"i": -1, "name": "the shared fixtures", "class": "FILES LOST", "detail": ", ".join(changed[:5]),
                        "argv": [], "s": 0})
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    counts = {}
    for r in results:
        counts[r["class"]] = counts.get(r["class"], 0) + 1
    print(f"\n{len(results)} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))
    bad = [r for r in results if r["class"] not in ("ok", "refusal")]
    for r in bad:
        print(f"  {r['class']:<13} {r['name']}: {r['detail'][:240]}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
