"""evaluate: the fixed-mask metrics against torch.nn.functional.cross_entropy on dense logits; determinism;
`maskedlm eval` on a run trained by maskedlm.train; data/model mismatches as one-line errors."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from inference_data import make_data, train_tiny
from train_data import make_data as make_cluster_data

from maskedlm.config import EvalConfig, MaskingConfig
from maskedlm.errors import UserError
from maskedlm.evaluate import evaluate, evaluate_model
from maskedlm.models import load_checkpoint_model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("evaluate"))


@pytest.fixture(scope="module")
def model(data):
    # A few steps: predictions are no longer uniform, so loss and accuracy carry information.
    return train_tiny(data, steps=40)


def _special(tok):
    from maskedlm.tokenizer import special_ids

    return special_ids(tok)


def _reference(model, store, ecfg: EvalConfig, special, vocab_size: int) -> tuple[float, float, int]:
    """Σ −log p / count with F.cross_entropy over dense (B, T, V) logits and -100 labels, the whole split at once."""
    from maskedlm.masking import corrupt, select_positions

    n = len(store) if not ecfg.max_rows else min(len(store), ecfg.max_rows)
    index = np.arange(n, dtype=np.int64)
    ids, flags = store.rows(index)
    ids, flags, rows = torch.as_tensor(ids), torch.as_tensor(flags), torch.as_tensor(index)
    # Built here field by field (not with EvalConfig.masking()), so a wrong mapping in evaluate would show.
    mcfg = MaskingConfig(mask_rate=ecfg.mask_rate, seed=ecfg.seed, unit=ecfg.unit)
    sel = select_positions(ids, rows, 0, mcfg, special, flags=flags)
    x_bar = corrupt(ids, sel, rows, 0, mcfg, special, vocab_size)
    labels = torch.where(sel.mask, ids, -100)  # (B, T): the gold token at A(x), ignored elsewhere
    with torch.no_grad():
        logits = model(x_bar)  # dense (B, T, V)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100, reduction="sum")
    count = int(sel.mask.sum())
    correct = int(((logits.argmax(-1) == ids) & sel.mask).sum())
    return float(total) / count, correct / count, count


def test_loss_and_accuracy_equal_dense_cross_entropy(data, model):
    from maskedlm.data.shards import open_split

    net, cfg, tok = model
    store = open_split(data, "val")
    special = _special(tok)
    V = cfg.model.vocab_size
    # micro_batch_rows 5 does not divide the split: the last micro-batch is short.
    ecfg = EvalConfig(micro_batch_rows=5, mask_rate=0.3, seed=99)
    got = evaluate(net, store, ecfg, special, V)
    loss, acc, count = _reference(net, store, ecfg, special, V)
    assert got["tokens"] == count and got["rows"] == len(store)
    assert got["loss"] == pytest.approx(loss, rel=1e-5)
    assert got["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert 0 < got["accuracy"] < 1
    assert got["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    # the same numbers whatever the micro-batch size (masks are keyed by row index, not by batch)
    assert evaluate(net, store, EvalConfig(micro_batch_rows=64, mask_rate=0.3, seed=99), special, V)["loss"] == pytest.approx(got["loss"], rel=1e-6)


def test_same_model_twice_gives_identical_metrics(data, model):
    from maskedlm.data.shards import open_split

    net, cfg, tok = model
    store = open_split(data, "train")
    ecfg = EvalConfig(micro_batch_rows=16, max_rows=40)
    net.train()  # evaluation switches to eval mode (no dropout) and restores the caller's mode
    try:
        a = evaluate(net, store, ecfg, _special(tok), cfg.model.vocab_size)
        assert net.training
        b = evaluate(net, store, ecfg, _special(tok), cfg.model.vocab_size)
    finally:
        net.eval()
    assert a == b
    assert a["rows"] == 40
    loss, _, count = _reference(net, store, ecfg, _special(tok), cfg.model.vocab_size)
    assert a["tokens"] == count and a["loss"] == pytest.approx(loss, rel=1e-5)
    other = evaluate(net, store, EvalConfig(micro_batch_rows=16, max_rows=40, seed=5), _special(tok), cfg.model.vocab_size)
    assert other["loss"] != a["loss"]  # the evaluation seed decides the mask


# ------------------------------------------------------------------------------- `maskedlm eval` on a trained run


@pytest.fixture(scope="module")
def run(tmp_path_factory, data):
    from maskedlm.train import train

    out = tmp_path_factory.mktemp("evalrun") / "run"
    train("tiny", data=data, out=out, overrides=["train.max_steps=6", "model.max_positions=64", "eval.every_steps=0",
                                                 "checkpoint.every_steps=0", "train.log_every_steps=100"])
    return out


def test_cli_eval_prints_the_metrics_of_the_run(run, data, capsys):
    from maskedlm.cli import main
    from maskedlm.data.shards import open_split
    from maskedlm.models import load_checkpoint_model

    main(["eval", str(run), "--data", str(data)])
    printed = json.loads(capsys.readouterr().out)
    net, cfg, tok = load_checkpoint_model(run)
    direct = evaluate(net, open_split(data, "val"), cfg.eval, _special(tok), cfg.model.vocab_size)
    for k in ("loss", "accuracy", "perplexity", "tokens", "rows"):
        assert printed[k] == direct[k]
    assert printed["split"] == "val"

    both = evaluate_model(run, data, split="all", overrides=["eval.max_rows=7"])
    assert set(both["splits"]) == {"train", "val"} and both["rows"] == 14
    t, v = both["splits"]["train"], both["splits"]["val"]
    assert both["tokens"] == t["tokens"] + v["tokens"]
    assert both["loss"] == pytest.approx((t["loss"] * t["tokens"] + v["loss"] * v["tokens"]) / both["tokens"])
    alone = evaluate_model(run, data, split="train", overrides=["eval.max_rows=7"])
    assert alone["loss"] == t["loss"] and alone["tokens"] == t["tokens"]  # pooled splits keep their own masks


def test_incompatible_data_is_refused(run, data, tmp_path):
    other_vocab = make_data(tmp_path / "v", vocab_size=50)
    with pytest.raises(UserError, match="vocab_size"):
        evaluate_model(run, other_vocab)
    # the same vocabulary under another normalizer: same vocab_size, a different tokenizer all the same
    from tokenizers import normalizers

    from maskedlm.data.prepare import prepare
    from maskedlm.tokenizer import load_tokenizer

    tok = load_tokenizer(data)
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    (tmp_path / "tok2").mkdir()
    tok.save(str(tmp_path / "tok2" / "tokenizer.json"))
    prepare([str(data.parent / "corpus.txt")], tmp_path / "tok2", 32, tmp_path / "t", val_fraction=0.1, doc_per="line",
            workers=1, progress=False)
    with pytest.raises(UserError, match="different tokenizer"):
        evaluate_model(run, tmp_path / "t")
    long_rows = tmp_path / "long"
    prepare([str(data.parent / "corpus.txt")], data, 96, long_rows, val_fraction=0.1, doc_per="line", workers=1, progress=False)
    with pytest.raises(UserError, match="positions"):
        evaluate_model(run, long_rows)


@pytest.mark.parametrize(
    "args, message",
    [
        (dict(model_path="missing-dir"), "does not exist"),
        (dict(overrides=["model.hidden=8"]), "eval.KEY=VALUE"),
        (dict(overrides=["eval.mask_rate=1.5"]), "mask_rate"),
        (dict(overrides=["eval.nope=1"]), "nope"),
        (dict(split="test"), "split"),
    ],
)
def test_evaluate_model_refuses_bad_input_with_what_is_wrong(run, data, tmp_path, args, message):
    kw = dict(model_path=run, data=data) | args
    if kw["model_path"] == "missing-dir":
        kw["model_path"] = tmp_path / "missing-dir"
    with pytest.raises(UserError, match=message):
        evaluate_model(**kw)


def test_missing_data_dir_is_one_line(run, tmp_path, capsys):
    from maskedlm.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", str(run), "--data", str(tmp_path / "nothing")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("maskedlm: error:") and "\n" not in err


# ---------------------------------------------------------------------------------- the evaluation mask's unit


def _two_token_words(data):
    """Rewrite the prepared flags so that words are two tokens long (the word-start bit on every other ordinary token):
    then a whole-word mask and a token mask differ, and a partly selected word is visible."""
    from maskedlm.data.shards import FLAG_DOC_START, FLAG_WORD_START

    for split in ("train", "val"):
        path = data / split / "shard_00000.flags.npy"
        ids, flags = np.load(data / split / "shard_00000.ids.npy"), np.load(path)
        ordinary = ids >= 5  # the generated vocabulary puts its 5 special tokens first
        for r in range(len(ids)):
            k = 0
            for i in range(ids.shape[1]):
                if not ordinary[r, i] or flags[r, i] & FLAG_DOC_START:
                    k = 0  # a special token or a document start begins a new count
                    continue
                if k % 2 == 1:
                    flags[r, i] &= ~np.uint8(FLAG_WORD_START)
                k += 1
        np.save(path, flags)
    return data


@pytest.fixture(scope="module")
def word_run(tmp_path_factory):
    """A run trained with whole-word masking (masking.unit=word), evaluated periodically with the default eval.*."""
    from maskedlm.train import train

    root = tmp_path_factory.mktemp("wordrun")
    data = _two_token_words(make_cluster_data(root / "data", rows=64, val_rows=24, seq_len=32))
    out = root / "run"
    train("tiny", data=data, out=out, overrides=["masking.unit=word", "train.max_steps=4", "eval.every_steps=4",
                                                 "eval.micro_batch_rows=7", "checkpoint.every_steps=0",
                                                 "train.log_every_steps=100"])
    return data, out


def _record_masks(monkeypatch):
    """Every selection that masking.mask_batch makes from now on, with the config it was made with."""
    import maskedlm.masking as masking

    seen, original = [], masking.mask_batch

    def recording(ids, row_index, epoch, cfg, *args, **kwargs):
        out = original(ids, row_index, epoch, cfg, *args, **kwargs)
        seen.append((cfg, kwargs.get("flags"), out.selection.mask))
        return out

    monkeypatch.setattr(masking, "mask_batch", recording)
    return seen


def test_default_eval_mask_is_token_level_whatever_the_run_trains_with(word_run, monkeypatch):
    from maskedlm.data.shards import open_split

    data, out = word_run
    net, cfg, tok = load_checkpoint_model(out)
    assert cfg.masking.unit == "word" and cfg.eval.unit == "token"
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line][-1]
    store = open_split(data, "val")
    loss, acc, count = _reference(net, store, cfg.eval, _special(tok), cfg.model.vocab_size)  # token-level masks
    assert logged["val_tokens"] == count and logged["val_loss"] == pytest.approx(loss, rel=1e-5)
    assert logged["val_accuracy"] == pytest.approx(acc, abs=1e-12)
    seen = _record_masks(monkeypatch)
    again = evaluate(net, store, cfg.eval, _special(tok), cfg.model.vocab_size)
    assert again["loss"] == logged["val_loss"]  # the run's periodic evaluation is this function with cfg.eval
    assert seen and all(c.unit == "token" and c.mask_rate == 0.15 and c.seed == 1234 for c, _, _ in seen)
    # whole-word evaluation of the same model scores other positions (the comparison below can fail)
    word = evaluate(net, store, EvalConfig(unit="word"), _special(tok), cfg.model.vocab_size)
    assert (word["tokens"], word["loss"]) != (again["tokens"], again["loss"])


def test_eval_unit_word_gives_whole_word_masks(word_run, monkeypatch):
    from maskedlm.data.shards import FLAG_WORD_START, open_split

    data, out = word_run
    net, cfg, tok = load_checkpoint_model(out)
    store = open_split(data, "val")
    ecfg = EvalConfig(unit="word", micro_batch_rows=5, mask_rate=0.2, seed=7)
    seen = _record_masks(monkeypatch)
    got = evaluate(net, store, ecfg, _special(tok), cfg.model.vocab_size)
    assert seen and all(c.unit == "word" for c, _, _ in seen)
    multi = 0
    for _, flags, mask in seen:
        word_id = torch.cumsum(((flags.long() & FLAG_WORD_START) != 0).long(), dim=1)  # (B, T): which word a token is in
        for r in range(mask.shape[0]):
            for w in torch.unique(word_id[r][mask[r]]):
                members = mask[r][word_id[r] == w]
                assert bool(members.all()), f"word {int(w)} of a row is partly selected"  # never part of a word
                multi += int(members.numel() > 1)
    assert multi > 0  # two-token words were selected whole, not just single-token words
    # the metrics are those of a dense cross-entropy reference at the same whole-word mask
    loss, acc, count = _reference(net, store, ecfg, _special(tok), cfg.model.vocab_size)
    assert got["tokens"] == count and got["loss"] == pytest.approx(loss, rel=1e-5)
    assert got["accuracy"] == pytest.approx(acc, abs=1e-12)


@pytest.mark.parametrize("override, message", [
    ("eval.unit=sentence", "eval.unit must be one of token, word, span, ngram, got 'sentence'"),
    ("eval.span_geometric_p=0", "eval.span_geometric_p must be in (0, 1], got 0.0"),
    ("eval.span_max_words=0", "eval.span_max_words must be >= 1, got 0"),
    ("eval.max_ngram=0", "eval.max_ngram must be >= 1, got 0"),
])
def test_bad_eval_unit_settings_are_refused_naming_the_value(override, message):
    from maskedlm.config import load_config

    with pytest.raises(UserError, match=re.escape(message)):
        load_config("tiny", [override])


@pytest.mark.slow
def test_maskedlm_eval_under_torchrun_prints_the_numbers_of_one_process(run, data):
    """`maskedlm eval` under torchrun shares the micro-batches out over the ranks; rank 0 alone prints, and the numbers
    are those of one process to the bit (same micro-batches, same masks, sums in the same order)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root / "src")}
    printed = {}
    for nproc in (1, 2):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)] if nproc > 1 else [sys.executable]
        done = subprocess.run([*launcher, "-m", "maskedlm", "eval", str(run), "--data", str(data), "--split", "all",
                               "eval.micro_batch_rows=3"], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count('"loss"') == 3  # one JSON document (pooled + two splits), from rank 0 only
        printed[nproc] = json.loads(done.stdout)
    assert printed[2] == printed[1] and printed[1]["rows"] > 6 and printed[1]["tokens"] > 0
