"""Tokenizer training and loading, checked against transformers' own tokenizer classes on the same files.

Also loading other people's tokenizers (vocab.txt, RoBERTa-style special tokens) and the errors for ones we cannot use."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models

from maskedlm.cli import main
from maskedlm.errors import UserError
from maskedlm.tokenizer import SPECIAL_TOKENS, SpecialIds, load_tokenizer, special_ids, tokenizer_hash, train_tokenizer

WORDS = ["Ka", "lomi", "nerusa", "tivo", "zébado", "fegi", "pé", "quba", "dofe", "gilo", "mira", "sorel"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    p = tmp_path_factory.mktemp("tokcorpus") / "c.txt"
    docs = [" ".join(rng.choice(WORDS) + rng.choice(["", "", ",", "."]) for _ in range(rng.randint(5, 30))) for _ in range(200)]
    p.write_text("\n\n".join(docs), encoding="utf-8")
    return p


SAMPLE = "Ka lomi, zébado pé qubadofe mira sorel."


@pytest.mark.parametrize("kind,vocab", [("wordpiece", 200), ("bpe", 350), ("unigram", 120)])
def test_trained_tokenizer_loads_in_transformers(tmp_path, corpus, kind, vocab):
    from transformers import PreTrainedTokenizerFast

    path = train_tokenizer([str(corpus)], vocab, kind, tmp_path / kind, lowercase=(kind == "wordpiece"))
    assert path == tmp_path / kind / "tokenizer.json"
    tok = load_tokenizer(path.parent)
    assert tok.get_vocab_size() <= vocab
    sp = special_ids(tok)
    assert [tok.id_to_token(i) for i in sp.all()] == list(SPECIAL_TOKENS)
    assert json.loads((path.parent / "special_ids.json").read_text()) == sp.as_dict()
    hf = PreTrainedTokenizerFast.from_pretrained(str(path.parent))
    assert hf.mask_token_id == sp.mask and hf.pad_token_id == sp.pad and hf.cls_token_id == sp.cls
    # transformers adds [CLS] ... [SEP] like BERT; the body is exactly our tokenizer's encoding.
    body = tok.encode(SAMPLE, add_special_tokens=False).ids
    assert hf(SAMPLE)["input_ids"] == [sp.cls, *body, sp.sep]
    assert sp.unk not in body or kind == "wordpiece"
    assert "".join(hf.decode(body).split()).lower() == "".join(SAMPLE.split()).lower() or kind == "wordpiece"


def test_cli_tokenizer_train(tmp_path, corpus, capsys):
    main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "150", "--kind", "unigram", "--out", str(tmp_path / "t")])
    assert "tokenizer.json" in capsys.readouterr().out
    assert special_ids(load_tokenizer(tmp_path / "t")).mask == 4


def test_vocab_txt_dir_matches_transformers_bert(tmp_path):
    from transformers import BertTokenizer  # the pure-Python WordPiece: an implementation we did not write

    vocab = list(SPECIAL_TOKENS) + ["the", "cat", "sat", "##s", "on", "mat", "ka", "##lo", "##mi", ",", ".", "c", "##a", "##t"]
    d = tmp_path / "bert"
    d.mkdir()
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    text = "The cats sat, on Kalomi mat. Dog"
    tok = load_tokenizer(d)  # no tokenizer_config.json: BERT's default lowercasing
    ref = BertTokenizer(str(d / "vocab.txt"), do_lower_case=True)
    assert tok.encode(text, add_special_tokens=False).ids == ref.encode(text, add_special_tokens=False)
    assert tok.encode(text).ids == ref.encode(text)
    (d / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    cased = load_tokenizer(d)
    ref = BertTokenizer(str(d / "vocab.txt"), do_lower_case=False)
    assert cased.encode(text, add_special_tokens=False).ids == ref.encode(text, add_special_tokens=False)
    assert special_ids(cased) == SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4)


def test_roberta_style_special_tokens(tmp_path):
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "hello": 4, "<mask>": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    sp = special_ids(load_tokenizer(tmp_path / "tokenizer.json"))
    assert sp == SpecialIds(pad=1, unk=3, cls=0, sep=2, mask=5) and set(sp.all()) == {0, 1, 2, 3, 5}


def test_a_tokenizer_without_sep_and_mask_is_refused_naming_them():
    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "hi": 3}, unk_token="[UNK]"))
    with pytest.raises(UserError, match=r"no \[SEP\], \[MASK\] token"):
        special_ids(tok)


def _bad_json(root):
    (root / "bad.json").write_text("{not json")
    return root / "bad.json"


def _empty_dir(root):
    (root / "empty").mkdir()
    return root / "empty"


@pytest.mark.parametrize("where, message", [
    (lambda root: root / "nope", "tokenizer not found"),
    (_empty_dir, "neither tokenizer.json nor vocab.txt"),
    (_bad_json, "cannot load tokenizer"),
], ids=["absent", "empty-dir", "not-json"])
def test_a_path_that_holds_no_tokenizer_is_refused(tmp_path, where, message):
    with pytest.raises(UserError, match=message):
        load_tokenizer(where(tmp_path))


def _empty_file(root, corpus):
    (root / "e.txt").write_text("")
    return [str(root / "e.txt")]


@pytest.mark.parametrize("inputs, vocab, kind, message", [
    (lambda root, corpus: [str(corpus)], 100, "sentencepiece", "kind must be one of"),
    (lambda root, corpus: [str(corpus)], 100, "bpe", "byte-level bpe must be > 261"),
    (_empty_file, 100, "wordpiece", "all 1 input files are empty"),
], ids=["unknown-kind", "bpe-vocab-under-its-bytes", "empty-input"])
def test_a_bad_tokenizer_training_is_refused_and_writes_nothing(tmp_path, corpus, inputs, vocab, kind, message):
    with pytest.raises(UserError, match=message):
        train_tokenizer(inputs(tmp_path, corpus), vocab, kind, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_tokenizer_hash_is_canonical(tmp_path, corpus):
    a = train_tokenizer([str(corpus)], 150, "wordpiece", tmp_path / "a")
    c = train_tokenizer([str(corpus)], 160, "wordpiece", tmp_path / "c")
    ta = load_tokenizer(a)
    assert tokenizer_hash(ta) == tokenizer_hash(load_tokenizer(a)) != tokenizer_hash(load_tokenizer(c))
    # Reformatting the JSON (key order, indentation) does not change the hash.
    spec = json.loads(a.read_text())
    (tmp_path / "re.json").write_text(json.dumps(dict(reversed(list(spec.items())))))
    assert tokenizer_hash(load_tokenizer(tmp_path / "re.json")) == tokenizer_hash(ta)


def test_padding_and_truncation_in_tokenizer_json_are_switched_off(tmp_path, corpus):
    # sentence-transformers ship tokenizer.json padded/truncated to a fixed length; prepare must see raw tokens.
    tok = load_tokenizer(train_tokenizer([str(corpus)], 200, "wordpiece", tmp_path / "t"))
    raw = tok.encode(SAMPLE).ids
    sp = special_ids(tok)
    tok.enable_padding(pad_id=sp.pad, pad_token="[PAD]", length=64)
    tok.enable_truncation(max_length=4)
    tok.save(str(tmp_path / "padded.json"))
    assert len(Tokenizer.from_file(str(tmp_path / "padded.json")).encode(SAMPLE).ids) == 64  # the file really pads
    assert load_tokenizer(tmp_path / "padded.json").encode(SAMPLE).ids == raw
