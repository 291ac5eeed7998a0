"""A generated corpus with a deterministic pattern and a tiny model that learns it (tests of evaluate/fill/explain).

Each line repeats one word of twelve, 4 to 9 times: a masked word is exactly its neighbours, so a model that learnt
the pattern fills it (whatever the word), while unigram statistics alone give 1/12.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split()
SEQ_LEN = 32


def write_corpus(path: Path, lines: int = 600, seed: int = 0) -> Path:
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(lines):
            word, n = r.choice(WORDS), r.randrange(4, 10)
            f.write(" ".join([word] * n) + "\n")
    return path


def make_data(root: Path, vocab_size: int = 200, seed: int = 0, lowercase: bool = False) -> Path:
    """Tokenizer trained on the corpus (WordPiece, the real code path) and a prepared data dir with a val split."""
    from maskedlm.data.prepare import prepare
    from maskedlm.tokenizer import train_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(root / "corpus.txt", seed=seed)
    train_tokenizer([str(corpus)], vocab_size, "wordpiece", root / "tok", lowercase=lowercase)
    prepare([str(corpus)], root / "tok", SEQ_LEN, root / "data", val_fraction=0.1, doc_per="line", workers=1,
            progress=False)
    return root / "data"


def tiny_config(vocab_size: int):
    from maskedlm.config import Config, ModelConfig

    return Config(model=ModelConfig(vocab_size=vocab_size, hidden=64, layers=1, heads=2, intermediate=128,
                                    max_positions=64, pad_vocab_multiple=8)).validate()


def train_tiny(data: Path, steps: int = 400, seed: int = 0):
    """A small training loop of the test's own (masking + objective as in training): (model, cfg, tokenizer)."""
    from maskedlm.config import MaskingConfig
    from maskedlm.data.shards import load_meta, open_split
    from maskedlm.model import MaskedLM
    from maskedlm.tokenizer import load_tokenizer, special_ids

    meta = load_meta(data)
    tok = load_tokenizer(data)
    special = special_ids(tok)
    cfg = tiny_config(int(meta["vocab_size"]))
    model = MaskedLM(cfg.model)
    model.init_weights(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    store = open_split(data, "train")
    rng = np.random.default_rng(seed)
    mcfg = MaskingConfig(mask_rate=0.15, seed=seed)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small is all overhead: more threads only contend on a shared CPU
    try:
        _loop(model, opt, store, rng, mcfg, special, cfg.model.vocab_size, steps)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model, cfg, tok


def _loop(model, opt, store, rng, mcfg, special, vocab_size, steps):
    from maskedlm.masking import mask_batch
    from maskedlm.objective import masked_cross_entropy

    for step in range(steps):
        index = rng.integers(0, len(store), 16)
        ids, flags = store.rows(index)
        b = mask_batch(torch.as_tensor(ids), torch.as_tensor(index), step, mcfg, special, vocab_size,
                       flags=torch.as_tensor(flags))
        loss = masked_cross_entropy(model(b.input_ids, positions=b.positions), b.targets, reduction="mean")
        opt.zero_grad()
        loss.backward()
        opt.step()
