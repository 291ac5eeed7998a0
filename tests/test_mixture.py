"""Mixtures of sources: MixLoader's shares, resume and ranks, and `maskedlm train --data A --data B`.

The references: the weights asked for (shares), an uninterrupted run (resume) and one process (ranks)."""

from __future__ import annotations

import numpy as np
import pytest
from train_data import make_data

from maskedlm.data.loader import MixLoader, mixture_sources
from maskedlm.errors import UserError


class FakeStore:
    """Rows whose ids say where they come from: [source, row, 0, ...]."""

    def __init__(self, source: int, n: int, seq_len: int = 4):
        self.source, self.n, self.seq_len = source, n, seq_len

    def __len__(self):
        return self.n

    def rows(self, idx):
        idx = np.asarray(idx, np.int64)
        ids = np.zeros((len(idx), self.seq_len), np.int64)
        ids[:, 0], ids[:, 1] = self.source, idx
        return ids, np.zeros(ids.shape, np.uint8)


def _rows(batch) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for mb in batch.micro for a, b in mb.ids[:, :2].tolist()]


def test_shares_are_the_weights_over_every_window():
    g, steps = 16, 1000
    src = np.concatenate([mixture_sources(7, s, g, [0.7, 0.3]) for s in range(steps)])
    assert abs((src == 0).mean() - 0.7) < 0.01
    # Every window of 200 steps, not just the whole run.
    per_step = (src.reshape(steps, g) == 0).sum(1)
    window = np.convolve(per_step, np.ones(200), "valid") / (200 * g)
    assert np.abs(window - 0.7).max() < 0.01
    three = np.concatenate([mixture_sources(0, s, 8, [2, 1, 1]) for s in range(steps)])
    np.testing.assert_allclose(np.bincount(three) / len(three), [0.5, 0.25, 0.25], atol=0.01)


def test_loader_shares_epochs_resume_and_ranks():
    stores = [FakeStore(0, 50), FakeStore(1, 7)]  # the small source runs out often: its own epochs
    loader = MixLoader(stores, [0.7, 0.3], 8, 4, seed=3)
    ref = [_rows(loader.next_step()) for _ in range(1000)]
    flat = [r for step in ref for r in step]
    share = sum(1 for s, _ in flat if s == 0) / len(flat)
    assert abs(share - 0.7) < 0.01
    # Source 1's rows come epoch after epoch: each run of 7 draws is a permutation of its 7 rows.
    ones = [r for s, r in flat if s == 1]
    for e in range(len(ones) // 7):
        assert sorted(ones[7 * e: 7 * e + 7]) == list(range(7))
    assert ones[:7] != ones[7:14]  # and each epoch is reshuffled
    assert loader.state_dict()["source_rows"] == [sum(1 for s, _ in flat if s == i) for i in (0, 1)]

    # Stopped at step 300 (with prefetching ahead) and resumed in a new loader: the same rows follow.
    a = MixLoader(stores, [0.7, 0.3], 8, 4, seed=3, prefetch_steps=2)
    assert [_rows(a.next_step()) for _ in range(300)] == ref[:300]
    state = a.state_dict()
    a.close()
    b = MixLoader(stores, [0.7, 0.3], 8, 4, seed=3, prefetch_steps=2)
    b.load_state_dict(state)
    assert [_rows(b.next_step()) for _ in range(200)] == ref[300:500]
    b.close()

    # Two ranks: each takes its half of every global batch, and together they see the rows of one process.
    ranks = [MixLoader(stores, [0.7, 0.3], 8, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    for step in range(100):
        got = [_rows(x.next_step()) for x in ranks]
        assert got[0] + got[1] == ref[step]

    with pytest.raises(UserError, match="resume the data order"):
        MixLoader(stores, [0.6, 0.4], 8, 4, seed=3).load_state_dict(state)


def test_mask_keys_differ_by_source_and_epoch():
    stores = [FakeStore(0, 5), FakeStore(1, 5)]
    loader = MixLoader(stores, [1, 1], 10, 10, seed=0)
    keys = np.concatenate([loader.next_step().micro[0].row_index.numpy() for _ in range(4)])
    assert len(set(keys.tolist())) == 40  # 4 epochs of 10 rows: no two rows share a mask key


# ------------------------------------------------------------------------------------------ training on a mixture

@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    return (make_data(d / "a", rows=128, val_rows=32, seed=1), make_data(d / "b", rows=40, val_rows=16, seed=2),
            make_data(d / "other", rows=64, val_rows=16, words=44, seed=3))


def _records(run):
    import json

    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.usefixtures("one_thread")
def test_train_on_a_mixture_logs_shares_evaluates_per_source_and_resumes(tmp_path, two_sources):
    import shutil

    import torch
    from safetensors.torch import load_file

    from maskedlm.train import train

    a, b, _ = two_sources
    args = ["train.max_steps=30", "checkpoint.every_steps=10", "checkpoint.keep=5", "train.log_every_steps=1000",
            "eval.every_steps=15", "train.precision=fp32", "data.weights=[0.7,0.3]"]
    full = tmp_path / "full"
    train("tiny", [a, b], full, args)
    recs = _records(full)
    steps = [r for r in recs if r.get("kind") != "eval"]
    last = steps[-1]["source_tokens"]
    assert sum(last) == steps[-1]["tokens"] and abs(last[0] / sum(last) - 0.7) < 0.02
    evals = [r for r in recs if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [15, 30]
    per = evals[-1]["val_sources"]
    assert len(per) == 2 and per[0]["rows"] == 32 and per[1]["rows"] == 16
    assert evals[-1]["val_loss"] == pytest.approx(0.7 * per[0]["loss"] + 0.3 * per[1]["loss"], rel=1e-12)
    # `maskedlm eval` with the same two --data gives the numbers training logged, per source and in total.
    from maskedlm.evaluate import evaluate_model

    again = evaluate_model(full, [a, b])
    assert again["weights"] == pytest.approx([0.7, 0.3]) and again["loss"] == evals[-1]["val_loss"]
    assert [r["loss"] for r in again["sources"]] == [r["loss"] for r in per]

    # Killed after the save at step 10 and resumed: the same rows, so bit-identical weights and the same records.
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for d in ("step_0000020", "step_0000030"):
        shutil.rmtree(cut / "checkpoints" / d)
    (cut / "checkpoints" / "latest").write_text("step_0000010\n")
    train(None, [a, b], cut, resume=True)
    ck = "checkpoints/step_0000030/model.safetensors"
    wa, wb = load_file(str(full / ck)), load_file(str(cut / ck))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    timing = ("tokens_per_s", "elapsed_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in _records(cut)] == \
        [{k: v for k, v in r.items() if k not in timing} for r in recs]


def test_mixture_refuses_other_tokenizers_and_wrong_weights(tmp_path, two_sources, capsys):
    from maskedlm.cli import main

    a, b, other = two_sources
    cases = ((["--data", str(other)], "differ in tokenizer"),
             (["--data", str(b), "data.weights=[0.5,0.3,0.2]"], "data.weights has 3 values for 2"))
    for extra, msg in cases:
        with pytest.raises(SystemExit) as e:
            main(["train", "--config", "tiny", "--data", str(a), *extra, "--out", str(tmp_path / "run"),
                  "train.max_steps=1"])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
        assert not (tmp_path / "run").exists()
