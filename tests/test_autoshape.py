"""`--config auto`: the rule's choice for given rates and budgets, the parameter count it uses, the CLI path."""

import json

import pytest
from train_data import make_data

from maskedlm import autoshape
from maskedlm.autoshape import Shape, budget_tokens, pick
from maskedlm.cli import main
from maskedlm.config import load_config
from maskedlm.data.shards import open_data_dir
from maskedlm.model import MaskedLM

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
QUIET = ["train.log_every_steps=1000", "eval.every_steps=0", "checkpoint.every_steps=0"]
# Non-embedding parameters by hand: layers × (4 C² + 3 C I), I = 1.5 C.
HAND = {"H128/L4": 4 * (4 * 128**2 + 3 * 128 * 192), "H192/L4": 4 * (4 * 192**2 + 3 * 192 * 288),
        "H256/L4": 4 * (4 * 256**2 + 3 * 256 * 384),
        "H384/L6": 6 * (4 * 384**2 + 3 * 384 * 576), "H512/L8": 8 * (4 * 512**2 + 3 * 512 * 768)}
SHAPES = [Shape(h, n) for h, n in autoshape.CANDIDATES]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"), rows=128, val_rows=16, seq_len=32)


@pytest.mark.parametrize("shape", SHAPES, ids=Shape.name)
def test_the_parameter_count_is_the_models_own_matrices(shape):
    """Shape.params against PyTorch's count of the weight matrices in the model's blocks (norms left out)."""
    cfg = load_config("auto", [f"model.hidden={shape.hidden}", f"model.layers={shape.layers}",
                               f"model.heads={shape.heads}", f"model.intermediate={shape.intermediate}",
                               "model.vocab_size=100"])
    blocks = MaskedLM(cfg.model).encoder.blocks
    assert shape.params() == HAND[shape.name()] == sum(p.numel() for p in blocks.parameters() if p.dim() == 2)


def _tokens(rates: dict, minutes: float, seq_len: int = 128) -> dict:
    cfg = load_config("auto", [f"train.max_minutes={minutes}"])
    return {n: budget_tokens(cfg, seq_len, r) for n, r in rates.items()}


@pytest.mark.parametrize("rates, minutes, chosen", [
    # the demo's 5 real idle minutes at 2 threads with Muon (bench/RESULTS.md: H192 12,140 tokens/s in a --wall run,
    # H128 1.58x that, H256 9,050): H128 gets 5.75M tokens, 10.3 per parameter; H192 3.64M, 2.91; the measured winner
    ({"H128/L4": 19_150, "H192/L4": 12_140, "H256/L4": 9_050}, 5, "H128/L4"),
    # 2 minutes: H192 1.2 per parameter (H128 won by 0.16 nats in tokens, 2 seeds); 10 minutes: H192 5.8 (the rule
    # moves on)
    ({"H128/L4": 19_150, "H192/L4": 12_140, "H256/L4": 9_050}, 2, "H128/L4"),
    ({"H128/L4": 19_150, "H192/L4": 12_140, "H256/L4": 9_050}, 10, "H192/L4"),
    # 20 minutes: H256 4.9 per parameter (the rule, not a measurement, moves to it here)
    ({"H128/L4": 19_150, "H192/L4": 12_140, "H256/L4": 9_050, "H384/L6": 3_800}, 20, "H256/L4"),
    # a fast machine: 10 minutes at 400k tokens/s for the largest is 13.5 per parameter
    ({"H128/L4": 3e6, "H192/L4": 2e6, "H256/L4": 1.5e6, "H384/L6": 8e5, "H512/L8": 4e5}, 10, "H512/L8"),
    # far too short for any: the smallest
    ({"H128/L4": 150, "H192/L4": 100, "H256/L4": 50}, 1, "H128/L4"),
])
def test_the_rule_picks_the_largest_shape_the_budget_trains_enough(rates, minutes, chosen):
    shape, why = pick(SHAPES, _tokens(rates, minutes))
    assert shape.name() == chosen and f"chose {chosen}" in why


def test_a_budget_in_steps_or_tokens_needs_no_rate_and_the_first_budget_ends_it():
    steps = load_config("auto", ["train.max_steps=100"])
    assert budget_tokens(steps, 128, None) == 100 * autoshape.ROWS * 128
    both = load_config("auto", ["train.max_minutes=1", "train.max_tokens=5000"])
    assert budget_tokens(both, 128, 1000.0) == 5000  # tokens end it before a minute at 1,000/s (60,000)
    assert budget_tokens(both, 128, 10.0) == 600  # here the minute ends it first


def test_choose_measures_only_until_a_shape_falls_short(data, monkeypatch):
    """Larger shapes run no faster, so once one misses the threshold the rest are not calibrated."""
    rates = {128: 90_000.0, 192: 80_000.0, 256: 60_000.0, 384: 1_000.0, 512: 500.0}
    measured = []

    def fake_rate(cfg, data):
        measured.append(cfg.model.hidden)
        return rates[cfg.model.hidden]

    cfg = load_config("auto", ["train.max_minutes=3", "model.vocab_size=64"])
    line = autoshape.choose(cfg, load_config("auto"), open_data_dir(data), fake_rate)
    # 3 minutes: H256 10.8M tokens, 4.85 per parameter; H384 180k, 0.02
    assert measured == [128, 192, 256, 384] and (cfg.model.hidden, cfg.model.heads, cfg.model.intermediate) == (256, 4, 384)
    assert (cfg.train.global_batch_rows, cfg.train.micro_batch_rows, cfg.optim.name, cfg.optim.lr) == (32, 32, "muon", 4e-3)
    assert "chose H256/L4" in line and "measured rates" in line


def test_cli_auto_with_a_tiny_budget_trains_the_chosen_shape_and_resume_keeps_it(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(autoshape, "CALIBRATE_SECONDS", 0.2)
    out = tmp_path / "run"
    main(["train", "--config", "auto", "--data", str(data), "--out", str(out), "train.max_minutes=0.01", *QUIET])
    printed = capsys.readouterr().out
    assert "auto shape: H128/L4 trains" in printed and "chose H128/L4" in printed
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model"]["hidden"], cfg["model"]["layers"], cfg["train"]["global_batch_rows"]) == (128, 4, 32)
    assert cfg["optim"]["name"] == "muon"
    assert cfg["train"]["auto_shape"] is True
    main(["train", "--config", "auto", "--resume", "--data", str(data), "--out", str(out), "train.max_minutes=0.02", *QUIET])
    assert "auto shape" not in capsys.readouterr().out  # the stored shape, no new calibration
    assert json.loads((out / "config.json").read_text())["model"]["hidden"] == 128


@pytest.mark.parametrize("override", ["model.hidden=128", "optim.lr=3e-3", "train.global_batch_rows=64",
                                      "optim.name=stable_adamw"])
def test_an_override_of_what_auto_chooses_is_refused_in_one_line(data, tmp_path, capsys, override):
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", "auto", "--data", str(data), "--out", str(tmp_path / "r"), "train.max_steps=2", override])
    key = override.split("=")[0]
    assert e.value.code == 2
    assert capsys.readouterr().err == f"maskedlm: error: train.auto_shape sets {key}; drop that override, or drop auto_shape\n"
    assert not (tmp_path / "r").exists()
