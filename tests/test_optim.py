"""Optimizers and schedules of the modern recipe: StableAdamW against a step written out here and against torch's AdamW,
the WSD decay shapes against their closed forms, and their config checks."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from train_data import eight_steps_and_a_resume_from_the_fourth

from maskedlm.config import OptimConfig, load_config
from maskedlm.errors import UserError
from maskedlm.optim import Schedule, StableAdamW, build_optimizer

LR, BETAS, EPS, WD = 0.01, (0.9, 0.98), 1e-6, 0.1


def _reference_step(p, g, m, v, t, wd):
    """One StableAdamW step as Wortsman et al. 2023 (Algorithm 2) write it, in float64: AdamW whose LR is divided by
    max(1, RMS), RMS = sqrt(mean(g² / max(v̂, eps²))), decay decoupled at that LR. Returns (p, m, v, RMS)."""
    b1, b2 = BETAS
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    rms = math.sqrt(float((g * g / torch.clamp(v_hat, min=EPS * EPS)).sum()) / g.numel())
    eta = LR / max(1.0, rms)
    p = p - eta * wd * p - eta * m_hat / (torch.sqrt(v_hat) + EPS)
    return p, m, v, rms


def _grads(steps, spike_at):
    gen = torch.Generator().manual_seed(0)
    out = []
    for t in range(1, steps + 1):
        gw, gb = torch.randn(6, 5, generator=gen), torch.randn(5, generator=gen) * 0.1
        if t == spike_at:  # a loss spike: one tensor's gradient 30x what its moment has seen
            gw = gw * 30.0
        out.append((gw, gb))
    return out


def _run(opt_cls, grads, **kwargs):
    gen = torch.Generator().manual_seed(1)
    w, b = torch.randn(6, 5, generator=gen).requires_grad_(), torch.randn(5, generator=gen).requires_grad_()
    opt = opt_cls([{"params": [w], "weight_decay": WD}, {"params": [b], "weight_decay": 0.0}], lr=LR, betas=BETAS, eps=EPS, **kwargs)
    for gw, gb in grads:
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
    return w.detach(), b.detach()


def test_stable_adamw_takes_the_written_out_step_and_clips_a_spike():
    grads = _grads(8, spike_at=5)
    w, b = _run(StableAdamW, grads)
    gen = torch.Generator().manual_seed(1)
    rw, rb = torch.randn(6, 5, generator=gen).double(), torch.randn(5, generator=gen).double()
    mw, vw, mb, vb = (torch.zeros_like(x) for x in (rw, rw, rb, rb))
    rms_seen = []
    for t, (gw, gb) in enumerate(grads, start=1):
        rw, mw, vw, rms = _reference_step(rw, gw.double(), mw, vw, t, WD)
        rb, mb, vb, _ = _reference_step(rb, gb.double(), mb, vb, t, 0.0)
        rms_seen.append(rms)
    assert rms_seen[4] > 2.0 and rms_seen[4] == max(rms_seen)  # the spike's step is the one clipped most
    torch.testing.assert_close(w.double(), rw, rtol=0, atol=1e-6)
    torch.testing.assert_close(b.double(), rb, rtol=0, atol=1e-6)
    # AdamW takes the spike's full step: without the clipping the weights would be elsewhere.
    aw, _ = _run(torch.optim.AdamW, grads, foreach=False)
    assert (aw - w).abs().max() > 1e-3


def test_stable_adamw_first_step_is_adamw():
    """At step 1, v̂ = g² so RMS = 1: nothing is clipped and the step is torch's AdamW's."""
    grads = _grads(1, spike_at=0)
    for a, b in zip(_run(StableAdamW, grads), _run(torch.optim.AdamW, grads, foreach=False)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_optim_name_builds_stable_adamw():
    cfg = load_config("tiny", ["model.vocab_size=45", "optim.name=stable_adamw"])
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(model, cfg.optim)
    assert isinstance(opt, StableAdamW) and [g["weight_decay"] for g in opt.param_groups] == [cfg.optim.weight_decay, 0.0]
    assert isinstance(build_optimizer(model, load_config("tiny").optim), torch.optim.AdamW)


def test_a_stable_adamw_run_resumes_bit_identically(tmp_path):
    """Its state (moments, step) goes through the checkpoint as AdamW's does."""
    full, cut = eight_steps_and_a_resume_from_the_fourth(tmp_path, ["optim.name=stable_adamw"])
    assert json.loads((cut / "config.json").read_text())["optim"]["name"] == "stable_adamw"
    a, b = (load_file(str(r / "checkpoints" / "step_0000008" / "model.safetensors")) for r in (full, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("shape, fall", [
    ("linear", lambda x: x),
    ("cosine", lambda x: (1 - math.cos(math.pi * x)) / 2),
    ("1-sqrt", math.sqrt),
])
def test_wsd_decay_shapes_follow_their_closed_form(shape, fall):
    """WSD over 100 steps, the last 20% decaying from lr to min_lr_ratio·lr: lr·(lo + (1 − lo)(1 − fall(x))) at
    fraction x of the decay (1-sqrt: Hägele et al. 2024, eq. for the cooldown)."""
    lo = 0.1
    s = Schedule(OptimConfig(lr=2.0, warmup_steps=0, schedule="wsd", decay_fraction=0.2, min_lr_ratio=lo,
                             decay_shape=shape), total_steps=100)
    assert s.lr(0) == 2.0 and s.lr(80) == 2.0
    for step in (81, 85, 90, 95, 99, 100):
        x = (step - 80) / 20
        assert s.lr(step) == pytest.approx(2.0 * (lo + (1 - lo) * (1 - fall(x))), rel=1e-12), step
    # by elapsed time too: the shape is of the decay's fraction, however progress is counted
    t = Schedule(OptimConfig(lr=1.0, warmup_steps=0, schedule="wsd", decay_fraction=0.5, decay_shape=shape), None)
    assert t.lr(3, 0.75) == pytest.approx(1 - fall(0.5), rel=1e-12)


def test_1_sqrt_differs_from_linear():
    lin, sq = (Schedule(OptimConfig(lr=1.0, warmup_steps=0, schedule="wsd", decay_fraction=0.5, decay_shape=s), 100)
               for s in ("linear", "1-sqrt"))
    assert lin.lr(75) == pytest.approx(0.5) and sq.lr(75) == pytest.approx(1 - math.sqrt(0.5))


@pytest.mark.parametrize("override, words", [
    ("optim.name=sgd", "optim.name must be adamw, stable_adamw or muon, got 'sgd'"),
    ("optim.decay_shape=sqrt", "optim.decay_shape must be linear, cosine or 1-sqrt, got 'sqrt'"),
    ("optim.decay_shape=1-sqrt", "optim.decay_shape shapes the decay phase of optim.schedule=wsd"),
])
def test_bad_optimizer_settings_are_refused_in_one_line(override, words):
    with pytest.raises(UserError) as e:
        load_config("bert-mini", [override])  # bert-mini's schedule is linear
    assert words in str(e.value) and "\n" not in str(e.value)
    assert load_config("modern-mini", ["optim.decay_shape=1-sqrt"]).optim.decay_shape == "1-sqrt"
