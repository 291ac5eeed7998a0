"""MaskedLM against Hugging Face transformers on identical weights, sparse vs dense, invariance, init."""

import pytest
import torch
import torch.nn.functional as F

from maskedlm.config import ModelConfig
from maskedlm.hf import from_hf_state_dict, hf_config, model_config_from_hf, to_hf_state_dict
from maskedlm.model import MaskedLM
from maskedlm.objective import masked_cross_entropy

V = 99  # not a multiple of 64: the padded rows must never show
FAMILIES = ["bert", "modern"]


def tiny(family, **kw):
    eps = 1e-12 if family == "bert" else 1e-5
    return ModelConfig(family=family, vocab_size=V, hidden=32, layers=3, heads=4, intermediate=48,
                       max_positions=64, layer_norm_eps=eps, **kw)


def perturbed(cfg, seed=0):
    """A model whose every tensor (norms and biases included) is non-trivial, so a mis-mapped tensor shows."""
    torch.manual_seed(seed)
    m = MaskedLM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        m.encoder.tok_embeddings.weight[V:].zero_()
        m.head.bias[V:].zero_()
    return m.eval()


def batch(seed=0, B=3, T=20, K=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, T), generator=g)
    positions = torch.stack([torch.randperm(T, generator=g)[:K] for _ in range(B)])  # (B, K)
    targets = torch.randint(0, V, (B, K), generator=g)
    targets[0, -1] = -100  # a padded slot of the sparse layout
    return x, positions, targets


def hf_model(cfg, attn="eager"):
    transformers = pytest.importorskip("transformers")
    hcfg = transformers.AutoConfig.for_model(**hf_config(cfg))
    return transformers.AutoModelForMaskedLM.from_config(hcfg, attn_implementation=attn).eval()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_and_loss_equal_transformers(family, attn):
    m = perturbed(tiny(family))
    hm = hf_model(m.cfg, attn)
    hm.load_state_dict(to_hf_state_dict(m), strict=True)
    expected_cls = "BertForMaskedLM" if family == "bert" else "ModernBertForMaskedLM"
    assert type(hm).__name__ == expected_cls
    if family == "modern":
        assert all(t == "full_attention" for t in hm.config.layer_types)
    x, positions, targets = batch()
    labels = torch.full_like(x, -100).scatter(1, positions, targets)  # dense labels: -100 outside A(x)
    with torch.no_grad():
        ours = m(x)
        out = hm(input_ids=x, labels=labels)
        sparse = m(x, positions)
    assert ours.shape == out.logits.shape == (3, 20, V)
    assert (ours - out.logits).abs().max().item() < 1e-5
    # the peer's loss is the mean over labelled positions; ours at A(x) only, from sparse logits
    ours_loss = masked_cross_entropy(sparse, targets, reduction="mean")
    assert abs(ours_loss.item() - out.loss.item()) < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_attention_mask_equals_transformers(family):
    m = perturbed(tiny(family))
    hm = hf_model(m.cfg)
    hm.load_state_dict(to_hf_state_dict(m), strict=True)
    x, _, _ = batch()
    am = torch.ones_like(x, dtype=torch.bool)
    am[1, 12:] = False
    am[2, 5:] = False
    with torch.no_grad():
        ours = m(x, attention_mask=am)
        theirs = hm(input_ids=x, attention_mask=am.long()).logits
    assert (ours - theirs)[am].abs().max().item() < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_equals_dense_cross_entropy(family):
    m = perturbed(tiny(family), seed=1)
    x, positions, targets = batch(seed=1)
    labels = torch.full_like(x, -100)
    keep = targets != -100
    for b in range(x.shape[0]):
        labels[b, positions[b][keep[b]]] = targets[b][keep[b]]
    with torch.no_grad():
        sparse = m(x, positions)  # (B, K, V)
        dense = m(x)  # (B, T, V)
    assert sparse.shape == (3, 4, V)
    assert torch.allclose(sparse, torch.gather(dense, 1, positions[..., None].expand(-1, -1, V)), atol=1e-6)
    ref = F.cross_entropy(dense.reshape(-1, V), labels.reshape(-1), ignore_index=-100, reduction="sum")
    assert abs(masked_cross_entropy(sparse, targets).item() - ref.item()) < 1e-6 * max(1.0, ref.item())


def test_predicting_the_whole_sequence_is_impossible_in_training():
    m = MaskedLM(tiny("bert")).train()
    x, positions, targets = batch()
    with pytest.raises(ValueError, match="positions"):
        m(x)  # no dense logits with gradients in training
    logits = m(x, positions)
    assert logits.shape == (3, 4, V)  # one row of logits per selected position, never (B, T, V)
    masked_cross_entropy(logits, targets).backward()
    with torch.no_grad():
        assert m.eval()(x).shape == (3, 20, V)  # inference may ask for every position


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_vocabulary_rows_never_predicted_or_trained(family):
    m = MaskedLM(tiny(family)).train()
    assert m.padded_vocab_size == 128 and m.vocab_size == V
    assert m.encoder.tok_embeddings.weight.shape[0] == 128
    x, positions, targets = batch()
    masked_cross_entropy(m(x, positions), targets).backward()
    assert torch.all(m.encoder.tok_embeddings.weight.grad[V:] == 0)
    assert torch.all(m.head.bias.grad[V:] == 0)
    assert torch.all(m.encoder.tok_embeddings.weight[V:] == 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_micro_batch_invariance(family):
    """One optimizer step's mean loss and gradients: one micro-batch of 16 rows == four of 4 (sum / global count)."""
    torch.manual_seed(5)
    m = MaskedLM(tiny(family)).train()
    x, positions, targets = batch(seed=5, B=16, T=16, K=5)
    targets[torch.rand(16, 5, generator=torch.Generator().manual_seed(6)) < 0.3] = -100  # uneven counts per row
    count = (targets != -100).sum()

    loss_one = masked_cross_entropy(m(x, positions), targets, normalizer=count)
    loss_one.backward()
    grads_one = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)

    loss_four = 0.0
    for i in range(4):
        s = slice(4 * i, 4 * i + 4)
        part = masked_cross_entropy(m(x[s], positions[s]), targets[s], normalizer=count)
        part.backward()
        loss_four += part.item()
    assert abs(loss_one.item() - loss_four) < 1e-6
    for n, p in m.named_parameters():
        assert torch.allclose(p.grad, grads_one[n], atol=1e-6, rtol=0), n
    # and a per-micro-batch mean (the classic mistake) would not agree
    wrong = sum(masked_cross_entropy(m(x[s], positions[s]), targets[s], reduction="mean").item() / 4
                for s in (slice(0, 4), slice(4, 8), slice(8, 12), slice(12, 16)))
    assert abs(wrong - loss_one.item()) > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_document_aware_attention_is_block_diagonal(family):
    m = perturbed(tiny(family, doc_attention=True), seed=2)
    x, _, _ = batch(seed=2, B=1, T=16)
    doc_starts = torch.zeros(1, 16, dtype=torch.bool)
    doc_starts[0, 1] = doc_starts[0, 9] = True  # [CLS] d1 (1..8) | d2 (9..15)
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % V  # change the second document only
    with torch.no_grad():
        a = m(x, doc_starts=doc_starts)
        b = m(y, doc_starts=doc_starts)
        full_a, full_b = m(x), m(y)
    assert torch.allclose(a[0, :9], b[0, :9], atol=1e-6)  # [CLS] and d1 do not see d2
    assert not torch.allclose(a[0, 9:], b[0, 9:], atol=1e-3)
    assert not torch.allclose(full_a[0, :9], full_b[0, :9], atol=1e-3)  # without doc_starts they do
    # doc_starts is ignored unless the config asks for document-aware attention
    m.cfg.doc_attention = False
    with torch.no_grad():
        assert torch.equal(m(x, doc_starts=doc_starts), full_a)


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_counts_match_transformers(family):
    m = MaskedLM(tiny(family))
    counts = m.num_parameters()
    hm = hf_model(m.cfg)
    assert counts["theta"] + counts["omega"] == sum(p.numel() for p in hm.parameters())
    assert counts["omega"] == sum(p.numel() for n, p in hm.named_parameters() if not n.startswith(("bert.", "model.")))
    assert counts["theta"] + counts["omega"] + counts["padding"] == sum(p.numel() for p in m.parameters())


def test_init_is_bert_style_and_deterministic():
    cfg = ModelConfig(family="bert", vocab_size=1000, hidden=64, layers=2, heads=4, intermediate=128)
    torch.manual_seed(0)
    a = MaskedLM(cfg)
    torch.manual_seed(0)
    b = MaskedLM(cfg)
    torch.manual_seed(1)
    c = MaskedLM(cfg)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["encoder.blocks.0.fc1.weight"], sc["encoder.blocks.0.fc1.weight"])
    w = sa["encoder.blocks.0.fc1.weight"]
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert torch.all(sa["encoder.blocks.0.fc1.bias"] == 0)
    assert torch.all(sa["encoder.emb_norm.weight"] == 1) and torch.all(sa["head.bias"] == 0)
    # init_weights(seed): same seed, same weights, whatever the global RNG did before
    torch.manual_seed(123)
    a.init_weights(7)
    torch.manual_seed(456)
    c.init_weights(7)
    assert all(torch.equal(a.state_dict()[k], c.state_dict()[k]) for k in sa)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_maps_round_trip_exactly(family):
    m = perturbed(tiny(family), seed=3)
    sd = to_hf_state_dict(m)
    cfg = model_config_from_hf(hf_config(m.cfg))
    assert cfg == m.cfg
    back = from_hf_state_dict(sd, cfg)
    ours = m.state_dict()
    assert set(back) == set(ours)
    assert all(torch.equal(back[k], ours[k]) for k in ours)


def test_untied_decoder_exports_its_own_weight():
    m = perturbed(tiny("bert", tie_embeddings=False), seed=4)
    hm = hf_model(m.cfg)
    hm.load_state_dict(to_hf_state_dict(m), strict=True)
    x, _, _ = batch()
    with torch.no_grad():
        assert (m(x) - hm(input_ids=x).logits).abs().max().item() < 1e-5


def test_bf16_autocast_forward_gives_fp32_loss():
    m = MaskedLM(tiny("modern")).train()
    x, positions, targets = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = masked_cross_entropy(m(x, positions), targets, reduction="mean")
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()


def test_a_zero_vocab_and_a_row_longer_than_max_positions_are_refused():
    with pytest.raises(ValueError, match="vocab_size"):
        MaskedLM(ModelConfig(vocab_size=0))
    m = MaskedLM(tiny("bert"))
    with pytest.raises(ValueError, match="max_positions"):
        m.eval()(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_equal_transformers(family):
    """One backward pass: every parameter's gradient (the tied decoder's share of the embedding included) equals
    transformers' on the same weights, x̄ and labels."""
    m = perturbed(tiny(family), seed=6).train()
    hm = hf_model(m.cfg).train()  # dropout is 0 in the tiny config, so train mode is deterministic
    hm.load_state_dict(to_hf_state_dict(m), strict=True)
    x, positions, targets = batch(seed=6)
    labels = torch.full_like(x, -100)
    keep = targets != -100
    for b in range(x.shape[0]):
        labels[b, positions[b][keep[b]]] = targets[b][keep[b]]
    masked_cross_entropy(m(x, positions), targets, reduction="mean").backward()
    hm(input_ids=x, labels=labels).loss.backward()
    grads = MaskedLM(m.cfg)  # a model whose "weights" are our gradients, so the key map names them
    with torch.no_grad():
        for (_, p), (_, g) in zip(m.named_parameters(), grads.named_parameters()):
            g.copy_(p.grad)
    ours = to_hf_state_dict(grads)
    theirs = {n: p.grad for n, p in hm.named_parameters()}
    assert theirs, "transformers model has no parameters with gradients"
    for name, g in theirs.items():
        assert torch.allclose(ours[name], g, atol=1e-6, rtol=1e-4), name
