"""Fine-tuning and probing: heads equal to transformers' classes, learning a generated task, the probe's signal,
seeds, DIR/best/ in transformers, file formats, metrics against hand computations, and refused input."""

import dataclasses
import gzip
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from train_data import make_data

from maskedlm.config import ModelConfig
from maskedlm.errors import UserError
from maskedlm.finetune import finetune
from maskedlm.tasks import get_task, load_task
from maskedlm.tasks.encode import _cut_pair
from maskedlm.tasks.heads import TaskModel, hf_task_config, to_hf_task_state_dict
from maskedlm.tasks.metrics import classify_metrics, entities, regress_metrics, token_metrics
from maskedlm.tasks.read import read_examples
from maskedlm.train import train

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
QUIET = ["eval.every_steps=0", "checkpoint.every_steps=0", "train.log_every_steps=1000"]
CLUSTERS, CLUSTER = 10, 4  # make_data's corpus: 40 words in 10 clusters of 4; a document draws from one cluster


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny BERT pretrained for 150 steps on the cluster corpus (it learns the clusters, see test_train.py) and the
    same model at its initial weights (lr 1e-30: one step moves nothing)."""
    root = tmp_path_factory.mktemp("ft")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the one_thread fixture; tiny models are all overhead
    data = make_data(root / "data", rows=256, val_rows=32, seq_len=32, words=CLUSTERS * CLUSTER, cluster=CLUSTER)
    train("tiny", data, root / "trained", ["train.max_steps=150", *QUIET])
    train("tiny", data, root / "random", ["train.max_steps=1", "optim.lr=1e-30", *QUIET])
    torch.set_num_threads(threads)
    return root


def _docs(n: int, rng: random.Random, members=range(CLUSTER)):
    """n (cluster, words) documents, each 5-10 words of one cluster, drawn from the given members of each cluster."""
    out = []
    for _ in range(n):
        c = rng.randrange(CLUSTERS)
        out.append((c, [f"w{c * CLUSTER + rng.choice(list(members))}" for _ in range(rng.randint(5, 10))]))
    return out


def _write_jsonl(path, records):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _classify_files(d: Path, seed=0, train_members=range(CLUSTER), eval_members=range(CLUSTER)):
    rng = random.Random(seed)
    files = {}
    for split, n, members in (("train", 200, train_members), ("eval", 100, eval_members), ("test", 100, eval_members)):
        files[split] = _write_jsonl(d / f"{split}.jsonl", [{"text": " ".join(w), "label": f"c{c}"}
                                                          for c, w in _docs(n, rng, members)])
    return files


# ------------------------------------------------------------------------------------------------ heads
def _random_task_model(family, task, num_labels, vocab=45):
    eps = 1e-12 if family == "bert" else 1e-5
    mcfg = ModelConfig(family=family, vocab_size=vocab, hidden=32, layers=2, heads=4, intermediate=48,
                       max_positions=64, layer_norm_eps=eps, pad_vocab_multiple=8)
    torch.manual_seed(0)
    m = TaskModel(mcfg, task, num_labels, dropout=0.1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m.eval()


@pytest.mark.parametrize("family", ["bert", "modern"])
@pytest.mark.parametrize("task", ["classify", "regress", "tokens"])
def test_heads_give_transformers_logits_and_loss(family, task):
    """Identical weights in transformers' own class (built from our config.json and state dict, strict load):
    logits and loss within 1e-5 in fp32, on a padded batch of text pairs (segment ids 1 on the second text)."""
    L = {"classify": 3, "regress": 1, "tokens": 4}[task]
    ours = _random_task_model(family, task, L)
    cfg = hf_task_config(ours, ["a", "b", "c", "d"][:L], {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4})
    config_cls = transformers.BertConfig if family == "bert" else transformers.ModernBertConfig
    hf_cfg = config_cls(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    hf_cfg._attn_implementation = "sdpa"
    theirs = getattr(transformers, cfg["architectures"][0])(hf_cfg).eval()
    result = theirs.load_state_dict(to_hf_task_state_dict(ours), strict=False)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "position_ids" not in k]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 45, (3, 12), generator=g)
    ids[:, 0], ids[:, 6], ids[:, -1] = 2, 3, 3
    mask = torch.ones_like(ids)
    mask[1, 9:], mask[2, 7:] = 0, 0
    types = torch.zeros_like(ids)
    types[:, 7:] = 1
    if task == "classify":
        labels = torch.tensor([0, 2, 1])
    elif task == "regress":
        labels = torch.tensor([0.5, -1.0, 2.0])
    else:
        labels = torch.randint(0, L, ids.shape, generator=g).masked_fill(mask == 0, -100)
    kw = {"token_type_ids": types} if family == "bert" else {}
    with torch.no_grad():
        mine = ours(ids, mask, types)
        total, count = get_task(task).loss_sum(mine, labels)
        hf = theirs(input_ids=ids, attention_mask=mask, labels=labels, **kw)
    if task == "tokens":
        torch.testing.assert_close(mine[mask.bool()], hf.logits[mask.bool()], rtol=0, atol=1e-5)
    else:
        torch.testing.assert_close(mine, hf.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(total / count, hf.loss, rtol=0, atol=1e-5)
    if family == "bert" and task == "classify":  # the segment ids reach the embeddings: other ids, other logits
        assert not torch.allclose(ours(ids, mask, torch.zeros_like(ids)), mine, atol=1e-4)


@pytest.mark.parametrize("family", ["bert", "modern"])
def test_a_fresh_classifier_is_drawn_as_transformers_draws_it_for_the_same_class(family):
    """transformers' own init of the class (from our config.json) is the reference: BERT N(0, 0.02); ModernBERT a
    normal of std hidden^-0.5 truncated at 2 std (0.125 before truncation at hidden 64). 200 labels x 64: the std
    of 12,800 draws is within 3% of the reference's, and no weight lies outside its bound."""
    from maskedlm.model import MaskedLM

    mcfg = ModelConfig(family=family, vocab_size=45, hidden=64, layers=2, heads=4, intermediate=96, max_positions=64,
                       pad_vocab_multiple=8)
    ours = TaskModel.from_mlm(MaskedLM(mcfg), "classify", 200, dropout=0.0, seed=3)
    cfg = hf_task_config(ours, [str(i) for i in range(200)], {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4})
    config_cls = transformers.BertConfig if family == "bert" else transformers.ModernBertConfig
    torch.manual_seed(0)
    theirs = getattr(transformers, cfg["architectures"][0])(
        config_cls(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}))
    mine, ref = ours.classifier.weight.detach(), theirs.classifier.weight.detach()
    assert mine.shape == ref.shape == (200, 64)
    assert abs(mine.std().item() / ref.std().item() - 1) < 0.03, (mine.std().item(), ref.std().item())
    assert mine.abs().max() <= (2 * 64 ** -0.5 if family == "modern" else 1.0)
    assert not ours.classifier.bias.any()


# ------------------------------------------------------------------------------------------------ end to end
def test_finetune_learns_the_task_and_best_reloads_in_transformers(runs, tmp_path, capsys):
    files = _classify_files(tmp_path)
    out = tmp_path / "out"
    r = finetune(runs / "trained", files["train"], files["eval"], out, test=files["test"],
                 overrides=["finetune.lr=1e-3", "finetune.epochs=4"])
    majority = max(sum(json.loads(line)["label"] == f"c{c}" for line in files["test"].read_text().splitlines())
                   for c in range(CLUSTERS)) / 100
    assert majority < 0.25 and r["test"]["accuracy"] > 0.8, (majority, r["test"])
    assert r["metric"] == "accuracy" and r["max_abs_diff_transformers"] <= 1e-4
    assert {p.name for p in out.iterdir()} == {"best", "metrics.jsonl", "predictions.jsonl", ".maskedlm-finetune"}
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["split"] for x in lines].count("eval") >= 1 and lines[-1]["split"] == "test"
    preds = [json.loads(x)["prediction"] for x in (out / "predictions.jsonl").read_text().splitlines()]
    # DIR/best/ through transformers' Auto classes and tokenizer alone gives the same predictions
    tok = transformers.AutoTokenizer.from_pretrained(str(out / "best"), local_files_only=True)
    hm = transformers.AutoModelForSequenceClassification.from_pretrained(str(out / "best"), local_files_only=True)
    texts = [json.loads(x)["text"] for x in files["test"].read_text().splitlines()]
    enc = tok(texts, padding=True, return_tensors="pt")
    assert enc["input_ids"][0, 0] == 2 and tok(texts[0])["input_ids"][-1] == 3  # [CLS] ... [SEP], as trained
    with torch.no_grad():
        hf_pred = hm(**enc).logits.argmax(-1).tolist()
    assert [hm.config.id2label[k] for k in hf_pred] == preds


def test_a_finetune_output_is_a_model_for_its_encoder_and_refused_where_the_mlm_head_counts(runs, tmp_path, capsys):
    """DIR and DIR/best/ as MODEL: their encoder is the fine-tuned one (transformers' own hidden states) and finetune
    takes it again; eval, fill, explain, score and export need the MLM head it lacks: one line naming what to pass.
    A --probe DIR holds no model at all."""
    from maskedlm.models import load_any_model

    files = _classify_files(tmp_path)
    ft = tmp_path / "ft"
    finetune(runs / "trained", files["train"], files["eval"], ft, overrides=["finetune.lr=1e-3", "finetune.max_steps=20"])
    hm = transformers.AutoModelForSequenceClassification.from_pretrained(str(ft / "best"), local_files_only=True).eval()
    ids = torch.tensor([[2, 10, 11, 12, 30, 3]])  # (1, T): [CLS] w5 w6 w7 w25 [SEP]
    with torch.no_grad():
        want = hm.bert(input_ids=ids).last_hidden_state  # (1, T, C)
        before = load_any_model(runs / "trained")[0].encoder(ids)
        assert (before - want).abs().max() > 1e-3  # fine-tuning moved the encoder: the check below can tell them apart
        for model in (ft, ft / "best"):
            assert (load_any_model(model, mlm_head=False)[0].encoder(ids) - want).abs().max() < 1e-5
    again = finetune(ft, files["train"], files["eval"], tmp_path / "again", overrides=["finetune.max_steps=2"])
    assert again["max_abs_diff_transformers"] <= 1e-4 and (tmp_path / "again" / "best").is_dir()
    capsys.readouterr()
    for model in (str(ft), str(ft / "best")):
        for argv in (["fill", model, "w0 [MASK]"], ["score", model, "w0 w1"], ["explain", model, "w0 w1", "--mask", "1"],
                     ["eval", model, "--data", str(runs / "data")], ["export", model, "--out", str(tmp_path / "x")]):
            err = _cli(argv, capsys)
            assert f"{ft / 'best'} is a fine-tuned BertForSequenceClassification: it has no MLM head" in err, err
            assert "pass the model it was fine-tuned from" in err
    assert not (tmp_path / "x").exists()
    finetune(runs / "trained", files["train"], files["eval"], tmp_path / "probe", probe=True)
    err = _cli(["fill", str(tmp_path / "probe"), "w0 [MASK]"], capsys)
    assert "is the output of `maskedlm finetune --probe`, which keeps no model; pass the MODEL that was probed" in err
    with pytest.raises(UserError, match="keeps no model"):
        finetune(tmp_path / "probe", files["train"], files["eval"], tmp_path / "p2")
    assert not (tmp_path / "p2").exists()


def test_probe_of_the_trained_model_beats_the_random_one(runs, tmp_path):
    """Eval examples use only the cluster members train examples never use: a probe can only succeed through what
    pretraining learnt (which words share a cluster); on random weights it is near chance (10%)."""
    files = _classify_files(tmp_path, train_members=(0, 1), eval_members=(2, 3))
    trained = finetune(runs / "trained", files["train"], files["eval"], tmp_path / "p1", probe=True)
    random_ = finetune(runs / "random", files["train"], files["eval"], tmp_path / "p2", probe=True)
    assert trained["eval"]["accuracy"] > random_["eval"]["accuracy"] + 0.3, (trained["eval"], random_["eval"])
    assert random_["eval"]["accuracy"] < 0.4 and not (tmp_path / "p1" / "best").exists()


def test_seeds_differ_and_one_seed_repeats_exactly(runs, tmp_path):
    files = _classify_files(tmp_path)
    over = ["finetune.max_steps=4", "finetune.eval_every_steps=2", "finetune.lr=5e-4"]
    a = finetune(runs / "trained", files["train"], files["eval"], tmp_path / "a", seeds=3, overrides=over)
    finetune(runs / "trained", files["train"], files["eval"], tmp_path / "b", seeds=1, overrides=over)
    recs = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in a["seeds"]] == [0, 1, 2]
    by_seed = {s: [(r["step"], r["train_loss"], r["accuracy"]) for r in recs if r["seed"] == s] for s in (0, 1, 2)}
    assert len({tuple(v) for v in by_seed.values()}) == 3  # three different runs
    again = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert again == [r for r in recs if r["seed"] == 0]  # seed 0 alone: the same numbers to the bit
    accs = [r["eval"]["accuracy"] for r in a["seeds"]]
    st = a["stats"]["eval"]["accuracy"]
    assert st["median"] == sorted(accs)[1] == a["eval"]["accuracy"]
    assert st["mean"] == pytest.approx(sum(accs) / 3) and st["std"] >= 0


def _tags(words):
    """Entity tags by cluster: clusters 0-2 are PER, 3-5 LOC, the rest O; a run of one type is B- then I-."""
    out, prev = [], "O"
    for w in words:
        c = int(w[1:]) // CLUSTER
        kind = "PER" if c < 3 else "LOC" if c < 6 else "O"
        out.append("O" if kind == "O" else ("I-" if prev == kind else "B-") + kind)
        prev = kind
    return out


def test_tokens_and_regress_on_modern(runs, tmp_path):
    """A modern model (pretrained briefly here) on a BIO task from CoNLL column files and on a regression from TSV;
    both DIR/best/ directories pass transformers' check."""
    train("tiny", runs / "data", tmp_path / "modern", ["model.family=modern", "model.layer_norm_eps=1e-5",
                                                        "train.max_steps=60", *QUIET])
    rng = random.Random(3)
    for split in ("train", "eval"):
        blocks = []
        for _ in range(150 if split == "train" else 60):
            words = [w for _, ws in _docs(rng.randint(1, 3), rng) for w in ws[:3]]
            blocks.append("\n".join(f"{w} X {t}" for w, t in zip(words, _tags(words))))
        (tmp_path / f"{split}.conll").write_text("-DOCSTART- -X- O\n\n" + "\n\n".join(blocks) + "\n")
        rows = ["id\ttext\tscore"] + [f"{i}\t{' '.join(w)}\t{c / 2}" for i, (c, w) in enumerate(_docs(150, rng))]
        (tmp_path / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    tags = finetune(tmp_path / "modern", tmp_path / "train.conll", tmp_path / "eval.conll", tmp_path / "t",
                    task="tokens", overrides=["finetune.lr=2e-3", "finetune.epochs=6"])
    assert tags["metric"] == "entity_f1" and tags["eval"]["entity_f1"] > 0.7, tags["eval"]
    assert tags["labels"] == ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"] and tags["max_abs_diff_transformers"] <= 1e-4
    reg = finetune(tmp_path / "modern", tmp_path / "train.tsv", tmp_path / "eval.tsv", tmp_path / "r", task="regress",
                   label_field="score", overrides=["finetune.lr=3e-3", "finetune.epochs=12"])
    assert reg["metric"] == "spearman" and reg["eval"]["spearman"] > 0.7, reg["eval"]
    assert reg["max_abs_diff_transformers"] <= 1e-4
    assert json.loads((tmp_path / "r" / "best" / "config.json").read_text())["problem_type"] == "regression"
    # the probe's two other heads: logistic regression per word (tokens) and least squares (regress)
    ptags = finetune(tmp_path / "modern", tmp_path / "train.conll", tmp_path / "eval.conll", tmp_path / "pt",
                     task="tokens", probe=True)
    preg = finetune(tmp_path / "modern", tmp_path / "train.tsv", tmp_path / "eval.tsv", tmp_path / "pr",
                    task="regress", label_field="score", probe=True)
    # O is 40% of the words; B- against I- needs the previous word, which conlleval's reading forgives at a start
    assert ptags["eval"]["token_accuracy"] > 0.6 and ptags["eval"]["entity_f1"] > 0.7, ptags["eval"]
    assert preg["eval"]["spearman"] > 0.9 and not (tmp_path / "pr" / "best").exists(), preg["eval"]


# ------------------------------------------------------------------------------------------------ reading
def test_files_glue_tsv_pairs_csv_and_gzip(tmp_path):
    # GLUE's MRPC-style TSV: a quote inside a text must not open a quoted field
    (tmp_path / "a.tsv").write_text('Quality\t#1 ID\t#1 String\t#2 String\n1\t7\tHe said "yes\tShe said no\n')
    ex = read_examples(tmp_path / "a.tsv", get_task("classify"), "#1 String", "#2 String", "Quality")
    assert ex.texts == ['He said "yes'] and ex.pairs == ["She said no"] and ex.labels == ["1"]
    (tmp_path / "b.csv").write_text('text,label\n"a, b",2.0\nc,3.5\n')
    assert read_examples(tmp_path / "b.csv", get_task("regress"), "text", None, "label").labels == [2.0, 3.5]
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "x", "label": 1}) + "\n" + json.dumps({"text": "y", "label": 1.0}) + "\n")
    assert read_examples(tmp_path / "c.jsonl.gz", get_task("classify"), "text", None, "label").labels == ["1", "1"]
    # a test file without labels is read for predictions only
    assert read_examples(tmp_path / "c.jsonl.gz", get_task("classify"), "text", None, "gold", labels_required=False).labels is None
    assert _cut_pair(10, 3, 8) == (5, 3) and _cut_pair(10, 9, 8) == (4, 4) and _cut_pair(2, 3, 8) == (2, 3)


# ------------------------------------------------------------------------------------------------ metrics
def test_metrics_against_hand_computations():
    # gold 0 0 1 1 2, pred 0 1 1 1 0: confusion rows (true) [1 1 0], [0 2 0], [1 0 0]
    m = classify_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0])
    assert m["accuracy"] == 3 / 5
    assert m["macro_f1"] == pytest.approx((2 * 1 / (2 + 1 + 1) + 2 * 2 / (4 + 1 + 0) + 0) / 3)
    # MCC = (c·s − Σ p_k t_k) / sqrt((s² − Σ p_k²)(s² − Σ t_k²)), c=3, s=5, t=(2,2,1), p=(2,3,0)
    assert m["mcc"] == pytest.approx((3 * 5 - (2 * 2 + 3 * 2 + 0)) / ((25 - 13) * (25 - 9)) ** 0.5)
    assert classify_metrics([0, 1], [0, 0])["mcc"] == 0.0  # one predicted class: undefined, scored 0
    r = regress_metrics([1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 2.0, 8.0])
    # ranks of the prediction with the tie shared: 1.5 1.5 3 4 against 1 2 3 4
    assert r["spearman"] == pytest.approx(4.5 / (5 * 4.5) ** 0.5)
    assert r["pearson"] == pytest.approx(torch.corrcoef(torch.tensor([[1., 2, 3, 4], [1., 1, 2, 8]]))[0, 1].item())
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["I-LOC", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-PER"], ["B-LOC", "O"]]  # the I-LOC after nothing starts an entity (conlleval)
    t = token_metrics(gold, pred)
    assert t["token_accuracy"] == 4 / 6  # words 4 and 5 differ
    assert (t["entity_precision"], t["entity_recall"]) == (2 / 3, 2 / 3) and t["entity_f1"] == pytest.approx(2 / 3)
    assert entities(["B-A", "I-B", "E-B", "S-C"]) == {(0, 1, "A"), (1, 3, "B"), (3, 4, "C")}


# ------------------------------------------------------------------------------------------------ bad input
def _cli(argv, capsys):
    from maskedlm.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("maskedlm: error: ") and err.count("\n") == 1, err
    return err


def test_bad_input_is_one_line_exit_2_and_nothing_written(runs, tmp_path, capsys):
    good = _write_jsonl(tmp_path / "good.jsonl", [{"text": "w0 w1", "label": "a"}, {"text": "w8 w9", "label": "b"}])
    cases = {
        "no column 'label'": [{"text": "w0", "lab": "a"}],
        "one class only": [{"text": "w0", "label": "a"}, {"text": "w1", "label": "a"}],
        "holds no examples": [],
    }
    for i, (msg, recs) in enumerate(cases.items()):
        bad = _write_jsonl(tmp_path / f"bad{i}.jsonl", recs)
        out = tmp_path / f"out{i}"
        err = _cli(["finetune", str(runs / "trained"), "--train", str(bad), "--eval", str(good), "--out", str(out)], capsys)
        assert msg in err and not out.exists() and not list(tmp_path.glob(f".out{i}*"))
    unseen = _write_jsonl(tmp_path / "unseen.jsonl", [{"text": "w0", "label": "zzz"}])
    err = _cli(["finetune", str(runs / "trained"), "--train", str(good), "--eval", str(unseen), "--out",
                str(tmp_path / "o")], capsys)
    assert "never has: 'zzz'" in err and not (tmp_path / "o").exists()
    err = _cli(["finetune", str(runs / "trained"), "--train", str(good), "--eval", str(good), "--out",
                str(tmp_path / "o"), "finetune.lr=-1"], capsys)
    assert "finetune.lr must be in (0, 1] or auto, got -1.0" in err
    # a MODEL whose tokenizer has more tokens than the model has rows
    from maskedlm.checkpoint import save_checkpoint
    from maskedlm.config import Config
    from maskedlm.model import MaskedLM
    from maskedlm.models import load_checkpoint_model

    _, cfg, _ = load_checkpoint_model(runs / "trained")
    small = dataclasses.replace(cfg.model, vocab_size=20)
    save_checkpoint(tmp_path / "mismatch", 1, MaskedLM(small), None, Config(model=small).to_dict(),
                    runs / "data" / "tokenizer.json", {})
    err = _cli(["finetune", str(tmp_path / "mismatch"), "--train", str(good), "--eval", str(good), "--out",
                str(tmp_path / "o")], capsys)
    assert "45 tokens but the model has 20" in err and not (tmp_path / "o").exists()
    with pytest.raises(UserError, match="--task must be one of"):
        load_task(None, None, "rank", {}, None, None, None, 8)


def test_probe_tasks_during_pretraining_are_logged_beside_the_loss(runs, tmp_path):
    """eval.probe_tasks: each evaluation logs probe/<task>/<metric>; the last equals a probe of the saved weights."""
    task = tmp_path / "clusters"
    task.mkdir()
    files = _classify_files(task, train_members=(0, 1), eval_members=(2, 3))
    files["test"].unlink()
    (task / "task.json").write_text(json.dumps({"task": "classify", "name": "cl"}))
    out = tmp_path / "run"
    train("tiny", runs / "data", out, ["train.max_steps=40", "eval.every_steps=20", "checkpoint.every_steps=0",
                                       "train.log_every_steps=1000", f"eval.probe_tasks=[{json.dumps(str(task))}]"])
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [e["step"] for e in evals] == [20, 40] and all(0 <= e["probe/cl/accuracy"] <= 1 for e in evals)
    again = finetune(out, files["train"], files["eval"], tmp_path / "p", probe=True)
    assert again["eval"]["accuracy"] == evals[-1]["probe/cl/accuracy"]


def test_bad_probe_tasks_are_refused_before_the_run_dir_is_written(tmp_path, capsys):
    """eval.probe_tasks is read when the run starts: a bad task is one line, exit 2, and no RUN_DIR (not a run dir
    with config.json and no checkpoint, which a second `train` without --resume would refuse)."""
    data = make_data(tmp_path / "data", rows=64, val_rows=8, seq_len=16)
    good = tmp_path / "ok"
    good.mkdir()
    _classify_files(good)
    bad = {}
    for name, files in {"json": {"train.jsonl": "not json\n"}, "column": {"train.jsonl": '{"txt": "w0", "label": "a"}\n'},
                        "meta": {"task.json": "[1]"}, "kind": {"task.json": '{"task": "rank"}'},
                        "noeval": {}}.items():
        d = tmp_path / name
        d.mkdir()
        for f in ("train.jsonl", "eval.jsonl"):
            if name != "noeval" or f == "train.jsonl":
                (d / f).write_text((good / f).read_text())
        for f, text in files.items():
            (d / f).write_text(text)
        bad[name] = d
    cases = {str(tmp_path / "nowhere"): "is not a directory", str(bad["json"]): "line 1 is not valid JSON",
             str(bad["column"]): "line 1 has no column 'text'", str(bad["meta"]): "task.json is not a JSON object",
             str(bad["kind"]): "task.json: task must be one of classify, regress, tokens, got 'rank'",
             str(bad["noeval"]): "has no eval file"}
    out = tmp_path / "run"
    for task, message in cases.items():
        err = _cli(["train", "--config", "tiny", "--data", str(data), "--out", str(out), "train.max_steps=4",
                    "eval.every_steps=2", "checkpoint.every_steps=2", f"eval.probe_tasks=[{json.dumps(task)}]"], capsys)
        assert err.startswith("maskedlm: error: eval.probe_tasks: ") and message in err, err
        assert not out.exists(), task
    # the good task beside a bad one: still refused, the list is checked whole
    err = _cli(["train", "--config", "tiny", "--data", str(data), "--out", str(out), "train.max_steps=4",
                f"eval.probe_tasks=[{json.dumps(str(good))}, {json.dumps(str(bad['json']))}]"], capsys)
    assert "line 1 is not valid JSON" in err and not out.exists()


def test_probe_imports_no_training_code():
    """probe.py runs inside pretraining's evaluation and under finetune --probe: it may read and encode tasks, never
    pull in a trainer, an optimizer, the training objective, checkpoints or the fine-tuned task heads."""
    import subprocess

    training = ("maskedlm.train", "maskedlm.finetune", "maskedlm.optim", "maskedlm.step", "maskedlm.objective",
                "maskedlm.checkpoint", "maskedlm.tasks.heads")
    code = f"import sys, maskedlm.probe; print(sorted(m for m in sys.modules if m in {training!r}))"
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "PATH": "/usr/bin:/bin"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_long_texts_are_truncated_and_counted_not_refused(runs, tmp_path, capsys):
    files = _classify_files(tmp_path)
    r = finetune(runs / "trained", files["train"], files["eval"], tmp_path / "o", overrides=["finetune.max_len=5",
                                                                                            "finetune.max_steps=2"])
    err = capsys.readouterr().err
    assert "note: 200 of 200 examples in" in err and "longer than 5 tokens and were truncated" in err
    assert 0 <= r["eval"]["accuracy"] <= 1


def test_out_is_never_an_input_and_overwrite_replaces_only_a_finetune_output(runs, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    good = _write_jsonl(tmp_path / "data" / "good.jsonl", [{"text": "w0 w1", "label": "a"}, {"text": "w8 w9", "label": "b"}])
    args = ["finetune", str(runs / "trained"), "--train", str(good), "--eval", str(good), "--probe"]
    before = sorted(p.name for p in (tmp_path / "data").iterdir())
    err = _cli([*args, "--out", str(tmp_path / "data"), "--overwrite"], capsys)  # the folder holding the inputs
    assert "contains the input" in err and sorted(p.name for p in (tmp_path / "data").iterdir()) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    err = _cli([*args, "--out", str(mine), "--overwrite"], capsys)
    assert "holds no finetune output" in err and (mine / "notes.txt").read_text() == "keep me"
    out = tmp_path / "ft"
    from maskedlm.cli import main

    main([*args, "--out", str(out)])
    first = (out / "metrics.jsonl").read_text()
    assert "already holds a finetune output" in _cli([*args, "--out", str(out)], capsys)
    main([*args, "--out", str(out), "--overwrite"])  # an earlier finetune's output may be replaced
    assert (out / "metrics.jsonl").read_text() == first  # the probe is deterministic


@pytest.mark.slow
def test_two_processes_fine_tune_as_one(runs, tmp_path):
    """torchrun with 2 gloo processes: each takes half of every batch and the step sums over both, so the
    fine-tuned model is the one a single process makes (dropout off, fp32; float summation order aside)."""
    import os
    import subprocess
    import sys

    files = _classify_files(tmp_path)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root / "src")}
    outs = {}
    for nproc in (1, 2):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"] if nproc == 2 else [sys.executable]
        outs[nproc] = tmp_path / f"out{nproc}"
        done = subprocess.run([*launcher, "-m", "maskedlm", "finetune", str(runs / "trained"), "--train",
                               str(files["train"]), "--eval", str(files["eval"]), "--test", str(files["test"]),
                               "--out", str(outs[nproc]), "finetune.lr=1e-3", "finetune.epochs=2", "finetune.dropout=0",
                               "finetune.precision=fp32"],  # exact to 1e-4 only in fp32: bf16 rounds each rank's sum
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(done.stdout)["test"]["accuracy"] > 0.5  # one JSON object: rank 0 alone printed it
    from safetensors.torch import load_file

    one, two = (load_file(str(outs[n] / "best" / "model.safetensors")) for n in (1, 2))
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-4, msg=k)
    assert (outs[1] / "predictions.jsonl").read_text() == (outs[2] / "predictions.jsonl").read_text()
