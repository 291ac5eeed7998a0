"""Config loading: presets, TOML files, dotted overrides with type coercion, and errors that name the key."""

import json

import pytest

from maskedlm.config import (
    Config,
    config_diff,
    config_from_dict,
    config_hash,
    load_config,
    preset_names,
)
from maskedlm.errors import UserError


def test_presets_named_in_the_issue_load_and_validate():
    assert {"tiny", "bert-mini", "bert-base", "modern-mini", "modern-base"} <= set(preset_names())
    for name in preset_names():
        load_config(name)  # validates
    mini = load_config("bert-mini").model
    assert (mini.family, mini.layers, mini.hidden) == ("bert", 4, 256)
    base = load_config("bert-base").model
    assert (base.layers, base.hidden, base.heads, base.intermediate) == (12, 768, 12, 3072)
    assert load_config("modern-base").model.family == "modern"


def test_overrides_are_coerced_to_the_field_types():
    cfg = load_config("tiny", [
        "train.max_steps=1e3", "optim.lr=5e-4", "train.compile=true", "optim.betas=0.9,0.95",
        "model.family=modern", "masking.mask_rate=0.3", "eval.every_steps=0", "train.max_minutes=2",
    ])
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)
    assert cfg.optim.lr == 5e-4
    assert cfg.train.compile is True
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.model.family == "modern"
    assert cfg.masking.mask_rate == 0.3
    assert cfg.eval.every_steps == 0
    assert cfg.train.max_minutes == 2.0 and isinstance(cfg.train.max_minutes, float)
    # the TOML array spelling works too
    assert load_config("tiny", ["optim.betas=[0.8, 0.9]"]).optim.betas == (0.8, 0.9)


@pytest.mark.parametrize("override, words", [
    ("train.max_step=10", ["'train.max_step'", "did you mean 'train.max_steps'"]),
    ("trian.max_steps=10", ["'trian.max_steps'", "train.max_steps"]),
    ("model.hiden=10", ["'model.hiden'", "model.hidden"]),
    ("nosuchsection.key=1", ["'nosuchsection.key'", "sections: model"]),
    ("train.max_steps=ten", ["train.max_steps", "'ten'"]),
    ("train.compile=maybe", ["train.compile", "'maybe'"]),
    ("optim.betas=0.9", ["optim.betas", "0.9"]),
    ("masking.mask_rate=1.5", ["masking.mask_rate", "1.5"]),
    ("optim.schedule=exponential", ["optim.schedule", "exponential"]),
    ("train.max_steps", ["section.key=value"]),
])
def test_bad_overrides_are_rejected_naming_the_key(override, words):
    with pytest.raises(UserError) as e:
        load_config("tiny", [override])
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_toml_file_with_base_and_unknown_key(tmp_path):
    good = tmp_path / "mine.toml"
    good.write_text('base = "bert-mini"\n[model]\nlayers = 2\n[optim]\nlr = 2e-4\n')
    cfg = load_config(good)
    assert cfg.model.layers == 2 and cfg.model.hidden == 256 and cfg.optim.lr == 2e-4
    bad = tmp_path / "typo.toml"
    bad.write_text("[train]\nmax_stpes = 3\n")
    with pytest.raises(UserError, match="train.max_stpes"):
        load_config(bad)
    with pytest.raises(UserError, match="neither a TOML file nor a preset"):
        load_config("no-such-preset")


def test_overrides_apply_after_the_file_in_order():
    cfg = load_config("tiny", ["train.max_steps=5", "train.max_steps=7"])
    assert cfg.train.max_steps == 7


def test_round_trip_through_json_and_hash():
    cfg = load_config("modern-mini", ["train.max_steps=10"])
    again = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    lr = load_config("modern-mini", ["train.max_steps=10", "optim.lr=1e-4"])
    assert config_hash(lr) != config_hash(cfg)
    assert config_diff(cfg, lr) == ["optim.lr"]
    # keys that only decide when to log/save/evaluate may change on resume
    ops = load_config("modern-mini", ["train.max_steps=10", "checkpoint.every_steps=7", "train.log_every_steps=3"])
    assert config_hash(ops) == config_hash(cfg) and config_diff(cfg, ops) == []


def test_load_config_accepts_a_config_object_without_mutating_it():
    base = Config()
    cfg = load_config(base, ["train.max_steps=3"])
    assert cfg.train.max_steps == 3 and base.train.max_steps == 0
