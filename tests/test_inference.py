"""fill, explain and score on a tiny model that learnt a generated pattern; references: the tokenizer's own encoding,
masked_cross_entropy, hand sums of −log softmax over dense logits, torch's own sort for ranks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from inference_data import WORDS, make_data, tiny_config, train_tiny

from maskedlm.errors import UserError
from maskedlm.inference import explain, fill, format_explain, format_fill, score
from maskedlm.models import load_any_model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("inference"))


@pytest.fixture(scope="module")
def trained(data):
    return train_tiny(data)


@pytest.fixture(scope="module")
def untrained(data, trained):
    from maskedlm.model import MaskedLM

    model = MaskedLM(trained[1].model)
    model.init_weights(1)
    return model.eval(), trained[1], trained[2]


def _dense_logp(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).float()[0], dim=-1)  # (T, V), positions None: dense


def test_fill_returns_the_learnt_token(trained, untrained):
    # The answer differs per line, so unigram statistics cannot pass; the untrained model shows the test can fail.
    hits, chance = 0, 0
    for w in WORDS:
        r = fill(trained, f"{w} {w} [MASK] {w} {w}")
        assert len(r["masks"]) == 1
        hits += r["masks"][0]["top"][0]["token"] == w
        chance += fill(untrained, f"{w} {w} [MASK] {w} {w}")["masks"][0]["top"][0]["token"] == w
    assert hits == len(WORDS)
    assert chance <= 2
    r = fill(trained, "kilo kilo [MASK] kilo")
    assert r["masks"][0]["top"][0]["prob"] > 0.5
    assert r["filled"] == "kilo kilo kilo kilo"


def test_fill_probabilities_and_several_masks(trained):
    model, cfg, tok = trained
    r = fill(trained, "echo [MASK] echo golf [MASK] golf", top_k=3)
    assert [m["position"] for m in r["masks"]] == [2, 5]
    assert r["tokens"] == tok.encode("echo [MASK] echo golf [MASK] golf").tokens  # the tokenizer's own [CLS] … [SEP]
    logp = _dense_logp(model, tok.encode("echo [MASK] echo golf [MASK] golf").ids)
    for m in r["masks"]:
        probs = [t["prob"] for t in m["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True)
        ref_p, ref_i = logp[m["position"]].exp().topk(3)
        assert [t["id"] for t in m["top"]] == ref_i.tolist()
        assert probs == pytest.approx(ref_p.tolist(), abs=1e-5)
    text = format_fill(r)
    assert "echo" in text and "golf" in text and "mask 2" in text


def test_explain_total_is_the_objective_on_that_example(trained):
    from maskedlm.objective import masked_cross_entropy

    model, cfg, tok = trained
    text = "delta delta delta alphalima delta"
    r = explain(trained, text, mask=["alphalima", "2"])
    assert set(r) == {"tokens", "corrupted_ids", "positions", "total"}
    enc = tok.encode(text)  # reference: the tokenizer with its post-processor adds [CLS]/[SEP] itself
    assert r["tokens"] == enc.tokens
    word = enc.word_ids[4]
    expect = sorted({2} | {i for i, w in enumerate(enc.word_ids) if w == word})
    assert len(expect) >= 3  # alphalima is several subword tokens: all of them are in A(x)
    assert [p["position"] for p in r["positions"]] == expect
    mask_id = tok.token_to_id("[MASK]")
    assert [r["corrupted_ids"][i] for i in expect] == [mask_id] * len(expect)  # seed 0: every selected token → [MASK]
    assert [i for i, (a, b) in enumerate(zip(r["corrupted_ids"], enc.ids)) if a != b] == expect
    for p in r["positions"]:
        assert set(p) == {"position", "gold", "gold_id", "p_gold", "rank", "top", "nll"}
        assert p["gold_id"] == enc.ids[p["position"]] and p["gold"] == enc.tokens[p["position"]]

    positions = torch.tensor([expect])
    targets = torch.tensor([[enc.ids[i] for i in expect]])
    with torch.no_grad():
        sparse = model(torch.tensor([r["corrupted_ids"]]), positions=positions)
    assert r["total"] == pytest.approx(float(masked_cross_entropy(sparse, targets, reduction="sum")), rel=1e-5)
    logp = _dense_logp(model, r["corrupted_ids"])
    hand = sum(-float(logp[i, enc.ids[i]]) for i in expect)
    assert r["total"] == pytest.approx(hand, rel=1e-5)
    for p in r["positions"]:
        row = logp[p["position"]]
        order = torch.argsort(row, descending=True).tolist()
        assert p["rank"] == order.index(p["gold_id"]) + 1
        assert [t["id"] for t in p["top"]] == order[:5]
        assert p["nll"] == pytest.approx(-float(row[p["gold_id"]]), abs=1e-5)
        assert p["p_gold"] == pytest.approx(math.exp(-p["nll"]), rel=1e-5)
    table = format_explain(r, tok)
    assert "A(x)" in table and "x̄" in table and f"{r['total']:.4f}" in table
    json.dumps(r)  # the --json form is plain JSON


def test_explain_seed_applies_the_training_corruption(trained):
    model, cfg, tok = trained
    text = " ".join(WORDS * 4)
    r0 = explain(trained, text, mask=WORDS, seed=0)
    r1 = explain(trained, text, mask=WORDS, seed=7)
    assert r1 == explain(trained, text, mask=WORDS, seed=7)  # deterministic
    assert [p["position"] for p in r1["positions"]] == list(range(1, 49))
    mask_id = tok.token_to_id("[MASK]")
    kinds = {"mask": 0, "same": 0, "random": 0}
    for p in r1["positions"]:
        got = r1["corrupted_ids"][p["position"]]
        kinds["mask" if got == mask_id else "same" if got == p["gold_id"] else "random"] += 1
    # 80/10/10 over 48 positions: [MASK] in the majority, and not all of them (p = 0.8^48 ≈ 2e-5 by chance).
    assert 24 <= kinds["mask"] < 48
    assert all(r0["corrupted_ids"][p["position"]] == mask_id for p in r0["positions"])
    assert r1["total"] == pytest.approx(sum(p["nll"] for p in r1["positions"]))


def test_score_is_a_pseudo_log_likelihood(trained):
    model, cfg, tok = trained
    s = score(trained, "kilo kilo kilo kilo")
    assert s["tokens_scored"] == 4 and len(s["per_token"]) == 4
    # Hand check of one term: token 2 masked, −log p of its gold from dense logits.
    ids = tok.encode("kilo kilo kilo kilo").ids
    masked = list(ids)
    masked[2] = tok.token_to_id("[MASK]")
    assert s["per_token"][1]["nll"] == pytest.approx(-float(_dense_logp(model, masked)[2, ids[2]]), abs=1e-5)
    assert s["pll"] == pytest.approx(-sum(t["nll"] for t in s["per_token"]))
    assert s["pll"] > score(trained, "kilo echo golf bravo")["pll"]  # the pattern scores higher than a jumble


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: fill(m, "kilo kilo kilo"), "[MASK]"),
        (lambda m: fill(m, " ".join(["kilo"] * 70) + " [MASK]"), "positions"),
        (lambda m: fill(m, "kilo [MASK]", top_k=0), "top-k"),
        (lambda m: fill(m, "   "), "empty"),
        (lambda m: explain(m, " ".join(["kilo"] * 70), mask=["1"]), "positions"),
        (lambda m: explain(m, "kilo echo", mask=["golf"]), "not a word"),
        (lambda m: explain(m, "kilo echo", mask=["0"]), "special"),
        (lambda m: explain(m, "kilo echo", mask=["9"]), "outside"),
        (lambda m: explain(m, "kilo echo", mask=[]), "--mask"),
    ],
)
def test_bad_text_is_a_user_error(trained, call, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call(trained)


def test_a_missing_model_path_is_a_one_line_error_in_the_api_and_the_cli(tmp_path, capsys):
    from maskedlm.cli import main

    with pytest.raises(UserError, match="does not exist"):
        load_any_model(tmp_path / "nope")
    with pytest.raises(UserError, match="does not exist"):
        fill(str(tmp_path / "nope"), "a [MASK]")
    with pytest.raises(SystemExit) as e:
        main(["explain", str(tmp_path / "nope"), "a b", "--mask", "a"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("maskedlm: error:") and "\n" not in err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data, trained):
    from maskedlm.checkpoint import save_checkpoint

    model, cfg, tok = trained
    out = tmp_path_factory.mktemp("run")
    save_checkpoint(out, 400, model, None, cfg.to_dict(), data / "tokenizer.json", {})
    return out


def _same_fill(a, b, text="golf golf [MASK] golf"):
    fa, fb = fill(a, text), fill(b, text)
    assert [t["id"] for t in fa["masks"][0]["top"]] == [t["id"] for t in fb["masks"][0]["top"]]
    assert [t["prob"] for t in fa["masks"][0]["top"]] == pytest.approx([t["prob"] for t in fb["masks"][0]["top"]], abs=1e-5)


def test_model_from_run_dir_checkpoint_dir_and_hugging_face_dir(tmp_path, run_dir, trained):
    from maskedlm.interop import export

    _same_fill(trained, load_any_model(run_dir))
    _same_fill(trained, load_any_model(run_dir / "checkpoints" / "step_0000400"))
    export(str(run_dir), out=tmp_path / "hf", verify=False)  # the transformers-side check is in test_hf.py
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "bert"
    _same_fill(trained, load_any_model(tmp_path / "hf"))
    _same_fill(trained, str(tmp_path / "hf"))  # every function takes the MODEL path too


def test_cli_fill_explain_score(run_dir, capsys):
    from maskedlm.cli import main

    main(["fill", str(run_dir), "hotel hotel [MASK] hotel", "--json"])
    assert json.loads(capsys.readouterr().out)["masks"][0]["top"][0]["token"] == "hotel"
    main(["explain", str(run_dir), "hotel hotel hotel", "--mask", "2", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert [p["position"] for p in r["positions"]] == [2] and r["total"] == r["positions"][0]["nll"]
    main(["explain", str(run_dir), "hotel hotel hotel", "--mask", "2"])
    assert "[MASK]" in capsys.readouterr().out  # the table shows x̄ with token strings
    main(["score", str(run_dir), "hotel hotel hotel"])
    assert json.loads(capsys.readouterr().out)["tokens_scored"] == 3


def test_inference_leaves_the_model_in_its_mode(trained):
    model = trained[0]
    model.train()
    try:
        fill(trained, "kilo [MASK] kilo")
        assert model.training
    finally:
        model.eval()
    assert tiny_config(10).model.max_positions == 64  # the bad-input lengths above rely on it


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_explain_selects_words_with_bpe_and_unigram_tokenizers(tmp_path, data, kind):
    # Byte-level BPE and Metaspace count the space before a word as part of it; a word still matches by its text.
    from maskedlm.model import MaskedLM
    from maskedlm.tokenizer import load_tokenizer, train_tokenizer

    tok = load_tokenizer(train_tokenizer([str(data.parent / "corpus.txt")], 300, kind, tmp_path / "tok"))
    cfg = tiny_config(tok.get_vocab_size())
    model = MaskedLM(cfg.model).eval()
    text = "alpha bravo charlie bravo"
    r = explain((model, cfg, tok), text, mask=["bravo"])
    enc = tok.encode(text)  # reference: the tokenizer's own word ids, with its [CLS]/[SEP] template
    bravo = {enc.word_ids[i] for i, (a, b) in enumerate(enc.offsets) if text[a:b].strip() == "bravo"}
    expect = [i for i, w in enumerate(enc.word_ids) if w in bravo and enc.tokens[i] not in ("[CLS]", "[SEP]")]
    assert len(bravo) == 2 and [p["position"] for p in r["positions"]] == expect
