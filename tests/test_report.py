"""`maskedlm report`: the page holds every figure and the runs' own numbers, and the anatomy adds up to `eval`."""

import html
import json
from html.parser import HTMLParser

import numpy as np
import pytest
from train_data import make_data

from maskedlm.data.shards import open_data_dir
from maskedlm.errors import UserError
from maskedlm.evaluate import evaluate
from maskedlm.models import load_checkpoint_model
from maskedlm.report import calibration, smooth, write_report
from maskedlm.train import train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
CURVES = {"train-loss-tokens", "train-loss-time", "eval-loss", "eval-loss-time", "eval-accuracy", "lr", "grad-norm",
          "throughput"}


class _Page(HTMLParser):
    """Figure ids, tables (id → rows of cell text) and the embedded JSON of a report page."""

    def __init__(self, text: str):
        super().__init__()
        self.figures, self.tables, self.svgs, self.external = [], {}, 0, []
        self._table, self._row, self._cell, self._json = None, None, None, None
        self.payload = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure":
            self.figures.append(a["id"][len("fig-"):])
        elif tag == "svg":
            self.svgs += 1
        elif tag == "table":
            self._table = self.tables.setdefault(a["id"], [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""
        elif tag == "script":
            self._json = "" if a.get("type") == "application/json" else None
            if a.get("src"):
                self.external.append(a["src"])
        for k in ("src", "href"):  # anything the browser would fetch (SVG's internal #refs are local)
            if a.get(k) and not a[k].startswith("#") and tag != "script":
                self.external.append(a[k])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "script" and self._json is not None:
            self.payload = json.loads(self._json)
            self._json = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._json is not None:
            self._json += data


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    data = make_data(tmp / "data", rows=128, val_rows=32, seq_len=32, words=40, cluster=4)
    common = ["train.max_steps=24", "eval.every_steps=8", "checkpoint.every_steps=0", "train.log_every_steps=1000"]
    a = tmp / "rate15"
    b = tmp / "rate30"
    train("tiny", data, a, common)
    train("tiny", data, b, [*common, "masking.mask_rate=0.3"])
    return data, a, b


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_report_of_two_runs_has_every_curve_and_their_final_numbers(runs, tmp_path):
    data, a, b = runs
    out = write_report([a, b], out=tmp_path / "r.html", png=tmp_path / "png")
    page = _Page(out.read_text())
    assert set(page.figures) == CURVES and page.svgs == len(CURVES) and not page.external
    assert sorted(p.stem for p in (tmp_path / "png").glob("*.png")) == sorted(CURVES)
    final = {row[0]: dict(zip(page.tables["final"][0], row)) for row in page.tables["final"][1:]}
    for run in (a, b):
        recs = _records(run)
        last = [r for r in recs if r.get("kind") != "eval"][-1]
        ev = [r for r in recs if r.get("kind") == "eval"][-1]
        row = final[run.name]
        assert int(row["step"]) == last["step"] == 24
        assert float(row["train loss"]) == pytest.approx(last["loss"], abs=5e-5)
        assert float(row["eval loss"]) == pytest.approx(ev["val_loss"], abs=5e-5)
        assert float(row["eval accuracy"]) == pytest.approx(ev["val_accuracy"], abs=5e-5)
    diff = {row[0]: row[1:] for row in page.tables["config"][1:]}
    assert diff == {"masking.mask_rate": ["0.15", "0.3"]}  # the only setting the two runs differ in
    assert [r["final"]["step"] for r in page.payload["runs"]] == [24, 24]
    # the command that made each run (here pytest's: train() was called from Python) is shown as recorded
    command = (a / "command.txt").read_text().strip()
    assert "pytest" in command or "__main__" in command
    assert html.escape(command) in out.read_text()


def test_anatomy_adds_up_to_the_evaluation_of_the_latest_checkpoint(runs, tmp_path):
    data, a, b = runs
    out = write_report([a, b], data=data, out=tmp_path / "r.html", png=tmp_path / "png")
    page = _Page(out.read_text())
    figures = {"anatomy-frequency", "anatomy-position", "anatomy-word-start", "anatomy-calibration", "anatomy-p-gold"}
    assert figures <= set(page.figures) and figures <= {p.stem for p in (tmp_path / "png").glob("*.png")}
    d = open_data_dir(data)
    for i, run in enumerate((a, b)):  # both runs, on the same data and evaluation mask
        an = page.payload["runs"][i]["anatomy"]
        model, cfg, _ = load_checkpoint_model(run)
        ev = evaluate(model, d.open("val"), cfg.eval, d.special, d.vocab_size)  # what `maskedlm eval` computes
        assert an["positions"] == ev["tokens"] and an["checkpoint_step"] == 24
        for table in ("by_frequency", "by_position", "by_word_start"):
            rows = an[table]
            assert sum(r["positions"] for r in rows) == ev["tokens"], table
            mean = sum(r["loss"] * r["positions"] for r in rows) / ev["tokens"]
            acc = sum(r["accuracy"] * r["positions"] for r in rows) / ev["tokens"]
            assert mean == pytest.approx(ev["loss"], rel=1e-5) and acc == pytest.approx(ev["accuracy"], abs=1e-9), table
        assert sum(r["positions"] for r in an["calibration"]) == ev["tokens"]
        assert sum(an["p_gold_histogram"]) == ev["tokens"]
        wrong = round((1 - ev["accuracy"]) * ev["tokens"])
        assert an["confusions"] and all(c["gold"] != c["predicted"] for c in an["confusions"])
        assert sum(c["count"] for c in an["confusions"]) <= wrong
        # the HTML table shows the same buckets
        assert len(page.tables[f"anatomy-{i}-by_frequency"]) == len(an["by_frequency"]) + 1
    assert page.payload["runs"][0]["anatomy"]["loss"] != page.payload["runs"][1]["anatomy"]["loss"]


def test_calibration_and_smoothing_by_hand():
    conf = np.array([0.05, 0.15, 0.15, 0.95])
    correct = np.array([0.0, 1.0, 0.0, 1.0])
    table, ece = calibration(conf, correct, bins=10)
    assert [r["positions"] for r in table] == [1, 2, 1]
    # |0 − 0.05|·1/4 + |0.5 − 0.15|·2/4 + |1 − 0.95|·1/4
    assert ece == pytest.approx(0.05 / 4 + 0.35 * 2 / 4 + 0.05 / 4)
    assert smooth([1, 2, 3, 4], 2).tolist() == [1.0, 1.5, 2.5, 3.5]


def test_not_a_run_dir_is_one_line(tmp_path):
    with pytest.raises(UserError, match="not a maskedlm run dir"):
        write_report([tmp_path], out=tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_cli_writes_a_report_and_replaces_only_a_report(runs, tmp_path, capsys):
    from maskedlm.cli import main

    _, a, _ = runs
    mine = tmp_path / "notes.html"
    mine.write_text("<html>my own notes</html>")
    with pytest.raises(SystemExit) as e:
        main(["report", str(a), "--out", str(mine)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "not a maskedlm report" in err
    assert mine.read_text() == "<html>my own notes</html>"  # untouched
    out = tmp_path / "r.html"
    for _ in range(2):  # a report is replaced by a new one
        main(["report", str(a), "--out", str(out)])
        assert f"wrote {out}" in capsys.readouterr().out and "train-loss-tokens" in out.read_text()
