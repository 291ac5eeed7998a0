"""Generated corpora with learnable structure, written in the prepared-data format (tests of training and resume).

The words are split into clusters of `cluster` words; each document draws its tokens uniformly from one cluster. A
model that has learnt the clusters predicts a masked token at about log(cluster) nats, while a model that knows only
unigram frequencies cannot do better than log(words): the gap is what the learning tests measure.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _rows(n_rows: int, seq_len: int, words: int, cluster: int, rng: np.random.Generator, first_word: int):
    ids = np.zeros((n_rows, seq_len), np.int64)
    flags = np.zeros((n_rows, seq_len), np.uint8)
    docs, left, c = 0, 0, 0
    for r in range(n_rows):
        ids[r, 0], flags[r, 0] = 2, 2  # [CLS], its own word
        i = 1
        while i < seq_len:
            if left == 0:  # a new document: [SEP] between documents, then a fresh cluster
                if docs and i > 1:
                    ids[r, i], flags[r, i] = 3, 2
                    i += 1
                    if i == seq_len:
                        break
                left, c = int(rng.integers(20, 60)), int(rng.integers(words // cluster))
                docs += 1
                flags[r, i] = 1
            ids[r, i] = first_word + c * cluster + int(rng.integers(cluster))
            flags[r, i] |= 2
            left -= 1
            i += 1
    return ids, flags, docs


def make_data(out, rows: int = 256, val_rows: int = 32, seq_len: int = 32, words: int = 40, cluster: int = 4, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from maskedlm.tokenizer import tokenizer_hash

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vocab = {t: i for i, t in enumerate(SPECIAL)}
    vocab.update({f"w{i}": len(SPECIAL) + i for i in range(words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(out / "tokenizer.json"))
    splits = {}
    counts = np.zeros(len(vocab), np.int64)
    for split, n in (("train", rows), ("val", val_rows)):
        ids, flags, docs = _rows(n, seq_len, words, cluster, rng, len(SPECIAL))
        (out / split).mkdir(exist_ok=True)
        np.save(out / split / "shard_00000.ids.npy", ids.astype(np.uint16))
        np.save(out / split / "shard_00000.flags.npy", flags)
        splits[split] = {"rows": n, "tokens": n * seq_len, "documents": docs, "shards": ["shard_00000"]}
        if split == "train":
            counts += np.bincount(ids.reshape(-1), minlength=len(vocab))
    np.save(out / "token_counts.npy", counts)
    meta = {
        "format_version": 1, "vocab_size": len(vocab), "seq_len": seq_len, "dtype": "uint16",
        "special_ids": {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4},
        "tokenizer_hash": tokenizer_hash(tok), "splits": splits, "sources": ["generated"],
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return out


def eight_steps_and_a_resume_from_the_fourth(tmp_path: Path, overrides: list[str]) -> tuple[Path, Path]:
    """Train the tiny preset (plus `overrides`) 8 steps with checkpoints at 4 and 8 into tmp_path/full; copy it to
    tmp_path/cut, drop step 8 there and resume from step 4 to 8. Returns (full, cut): a resume that restores every
    piece of state leaves the two step-8 checkpoints equal."""
    import shutil

    from maskedlm.train import train

    data = make_data(tmp_path / "data", rows=64, val_rows=0, seq_len=32, words=40, cluster=4)
    args = [*overrides, "train.max_steps=8", "checkpoint.every_steps=4", "checkpoint.keep=5",
            "train.log_every_steps=1000", "eval.every_steps=0", "train.precision=fp32"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    train("tiny", data, full, args)
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step_0000008")
    (cut / "checkpoints" / "latest").write_text("step_0000004\n")
    train(None, data, cut, resume=True)
    return full, cut
