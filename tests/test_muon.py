"""optim.name=muon: Muon for the encoder's matrices and AdamW for the rest, checked against torch's own Muon and AdamW
stepping the same parameters with the same gradients; its LR schedule, its checkpoint (resumed bit for bit) and its
refusal of FSDP2 shards."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from train_data import eight_steps_and_a_resume_from_the_fourth

from maskedlm.config import load_config
from maskedlm.errors import UserError
from maskedlm.model import MaskedLM
from maskedlm.optim import MuonAdamW, build_optimizer, param_groups, set_lr


def _model(*overrides):
    cfg = load_config("tiny", ["model.family=modern", "model.vocab_size=45", "optim.name=muon", "optim.lr=0.02",
                               "optim.weight_decay=0.1", *overrides])
    torch.manual_seed(0)
    return MaskedLM(cfg.model), cfg


def _names(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("tied", [True, False])
def test_muon_takes_the_linear_layers_matrices_and_adamw_the_rest(tied):
    model, cfg = _model(f"model.tie_embeddings={str(tied).lower()}")
    opt = build_optimizer(model, cfg.optim)
    assert isinstance(opt, MuonAdamW)
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    muon = _names(model, [p for g in opt.muon.param_groups for p in g["params"]])
    adamw = _names(model, [p for g in opt.adamw.param_groups for p in g["params"]])
    assert muon == linear and len(muon) == 2 * 4 + 1  # per layer qkv, proj, fc1, fc2; the head's dense
    assert muon.isdisjoint(adamw) and muon | adamw == {n for n, _ in model.named_parameters()}
    assert "encoder.tok_embeddings.weight" in adamw
    assert ("head.decoder" in adamw) == (not tied)  # an untied decoder is an output layer: AdamW's, not Muon's


def test_a_muon_adamw_step_is_torchs_muon_and_adamw_on_the_same_parameters():
    """Three steps with the schedule's LR set between them, against torch.optim.Muon on the Linear weights (Moonshot's
    AdamW-matched scale, optim.lr and optim.weight_decay) and torch.optim.AdamW on the others with param_groups'
    decay split: the same bits. A wrong split, LR or decay would move some parameter elsewhere."""
    model, cfg = _model()
    ref = copy.deepcopy(model)
    opt = build_optimizer(model, cfg.optim)
    linear = {id(m.weight) for m in ref.modules() if isinstance(m, torch.nn.Linear)}
    o = cfg.optim
    muon = torch.optim.Muon([p for p in ref.parameters() if id(p) in linear], lr=o.lr, weight_decay=o.weight_decay,
                            adjust_lr_fn="match_rms_adamw")
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in linear]} for g in param_groups(ref, o)]
    adamw = torch.optim.AdamW([g for g in rest if g["params"]], lr=o.lr, betas=o.betas, eps=o.eps, fused=True)
    gen = torch.Generator().manual_seed(3)
    for lr in (0.02, 0.01, 0.005):
        grads = [torch.randn(p.shape, generator=gen) for p in model.parameters()]
        for a, b, g in zip(model.parameters(), ref.parameters(), grads):
            a.grad, b.grad = g.clone(), g.clone()
        set_lr(opt, lr)
        opt.step()
        for r in (muon, adamw):
            for group in r.param_groups:
                group["lr"] = lr
            r.step()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), name
    moved = [n for (n, a), b in zip(model.named_parameters(), _model()[0].parameters()) if not torch.equal(a, b)]
    assert len(moved) == len(list(model.parameters()))  # every parameter took steps


def test_muon_refuses_fsdp2_shards():
    model, cfg = _model()
    model.head.dense.weight.full_tensor = lambda: None  # what makes an FSDP2 shard (a DTensor) one to optim.py
    with pytest.raises(UserError, match="train.parallel=ddp"):
        build_optimizer(model, cfg.optim)


def test_a_muon_run_resumes_bit_identically(tmp_path):
    """Both optimizers' state (Muon's momentum, AdamW's moments) goes through one checkpoint file and back."""
    full, cut = eight_steps_and_a_resume_from_the_fourth(tmp_path, ["model.family=modern", "optim.name=muon"])
    assert json.loads((cut / "config.json").read_text())["optim"]["name"] == "muon"
    a, b = (load_file(str(r / "checkpoints" / "step_0000008" / "model.safetensors")) for r in (full, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the file holds both optimizers' state, keyed by parameter name: Muon's momentum and AdamW's moments
    state = torch.load(full / "checkpoints" / "step_0000004" / "optimizer.pt", weights_only=True)["state"]
    assert {k for k, v in state.items() if "momentum_buffer" in v} >= {"encoder.blocks.0.attn.qkv.weight"}
    assert "exp_avg" in state["encoder.tok_embeddings.weight"]
