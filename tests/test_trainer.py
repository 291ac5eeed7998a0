"""Trainer.train_step on its own: the optimizer step that `maskedlm train` and bench/throughput.py both run.

The references are PyTorch's own cross-entropy on the model's dense logits and the weights a step over the whole
batch gives; the step's bookkeeping (normaliser, accumulation, skip) is what is under test.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from train_data import make_data

from maskedlm.config import load_config
from maskedlm.data.shards import open_data_dir
from maskedlm.model import MaskedLM
from maskedlm.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"), rows=128, val_rows=16, seq_len=32, words=40, cluster=4)


def _trainer(data, micro_rows: int, family: str = "bert") -> Trainer:
    cfg = load_config("tiny", [f"model.family={family}", "model.dropout=0", "train.max_steps=10", "optim.warmup_steps=0",
                               "train.global_batch_rows=16", f"train.micro_batch_rows={micro_rows}", "train.prefetch=false",
                               "eval.every_steps=0"])
    cfg.model.vocab_size = 45
    cfg.validate()
    model = MaskedLM(cfg.model)
    model.init_weights(0)
    return Trainer(cfg, model, open_data_dir(data), device=torch.device("cpu"))


def _reference_loss(model: MaskedLM, batch) -> float:
    """Σ −log p over A(x) of the whole step / |A(x)|, from F.cross_entropy on logits at every position."""
    total, count = 0.0, 0
    with torch.no_grad():
        for mb in batch.micro:
            m = mb.masked
            B, T = m.input_ids.shape
            every = torch.arange(T).expand(B, T)
            logits = model(m.input_ids, positions=every)  # (B, T, V)
            labels = torch.full((B, T), -100)
            rows = torch.arange(B).unsqueeze(1).expand_as(m.positions)
            labels[rows[m.valid], m.positions[m.valid]] = m.targets[m.valid]
            total += F.cross_entropy(logits.reshape(B * T, -1), labels.reshape(-1), reduction="sum").item()
            count += int(m.valid.sum())
    return total / count


def test_one_step_with_accumulation_4_equals_one_step_over_the_whole_batch(data):
    # bert: AdamW's first update is lr·g/(|g|+eps), so float noise in a gradient of size ~eps moves a weight by up to
    # lr; the modern preset's embeddings have such rows (1.9e-6 apart here), bert's tiny preset none (≤ 8.5e-7).
    family = "bert"
    whole, split = _trainer(data, 16, family), _trainer(data, 4, family)
    b_whole, b_split = whole.loader.next_step(), split.loader.next_step()
    assert len(b_whole.micro) == 1 and len(b_split.micro) == 4
    assert torch.equal(b_whole.micro[0].ids, torch.cat([mb.ids for mb in b_split.micro]))  # the same rows and masks
    expected = _reference_loss(whole.model, b_whole)
    r_whole, r_split = whole.read(whole.train_step(b_whole)), split.read(split.train_step(b_split))
    assert r_whole["loss"] == pytest.approx(expected, rel=1e-5) and r_split["loss"] == pytest.approx(expected, rel=1e-5)
    assert r_split["grad_norm"] == pytest.approx(r_whole["grad_norm"], rel=1e-5)
    changed = 0
    for (name, a), b in zip(whole.model.state_dict().items(), split.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
        changed += not torch.equal(a, _trainer(data, 16, family).model.state_dict()[name])
    assert changed > 0  # the step did update the weights
    assert whole.step == split.step == 1 and whole.skipped == split.skipped == 0


def test_a_non_finite_loss_leaves_weights_and_optimizer_state_untouched(data):
    trainer = _trainer(data, 8)
    trainer.read(trainer.train_step(trainer.loader.next_step()))  # a normal step first: the optimizer has state
    weights = copy.deepcopy(trainer.model.state_dict())
    optim = copy.deepcopy(trainer.optimizer.state_dict())
    hook = trainer.model.register_forward_hook(lambda _m, _args, logits: logits * float("nan"))
    rec = trainer.read(trainer.train_step(trainer.loader.next_step()))
    hook.remove()
    assert rec["skipped"] is True and trainer.skipped == 1 and trainer.bad_in_row == 1 and trainer.step == 2
    for name, w in trainer.model.state_dict().items():
        assert torch.equal(w, weights[name]), name
    after = trainer.optimizer.state_dict()
    assert after["state"].keys() == optim["state"].keys()
    for p, st in optim["state"].items():
        for k, v in st.items():
            assert torch.equal(after["state"][p][k], v), (p, k)
    rec = trainer.read(trainer.train_step(trainer.loader.next_step()))  # and training goes on afterwards
    assert "skipped" not in rec and trainer.bad_in_row == 0
    assert any(not torch.equal(w, weights[n]) for n, w in trainer.model.state_dict().items())
