"""The report in a real headless browser: it renders, logs no console message and asks the network for nothing.

A control page with a console error and a remote image shows that both checks can fail. Chromium comes from Debian's
package (`make test-slow` installs it when missing); the browser's own background traffic goes to a closed local
proxy port and is told apart from the page's requests by its initiator.
"""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from train_data import make_data

from maskedlm.report import write_report
from maskedlm.train import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _open(page: Path, tmp: Path) -> tuple[list[str], list[str], Path]:
    """(console lines, URLs the page asked for, screenshot) of `page` in headless Chromium."""
    netlog, shot = tmp / f"{page.stem}.netlog.json", tmp / f"{page.stem}.png"
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
            "--disable-default-apps", "--no-default-browser-check", "--disable-features=Translate,MediaRouter",
            "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",  # nothing leaves the machine
            f"--user-data-dir={tmp / (page.stem + '-profile')}", f"--log-net-log={netlog}", f"--screenshot={shot}",
            "--window-size=1100,2400", page.resolve().as_uri()]
    p = subprocess.run(args, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    console = [line for line in p.stderr.splitlines() if ":CONSOLE" in line]
    events = json.loads(netlog.read_text())["events"]
    # A request a page made carries the page's origin as initiator ("null" for file://); the browser's own
    # background requests carry "not an origin".
    asked = sorted({e["params"]["url"] for e in events
                    if "url" in e.get("params", {}) and e["params"].get("initiator") not in (None, "not an origin")})
    return console, asked, shot


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test-slow installs Debian's package)")
def test_report_renders_offline_without_console_errors(tmp_path):
    data = make_data(tmp_path / "data", rows=128, val_rows=32, seq_len=32, words=40, cluster=4)
    train("tiny", data, tmp_path / "run", ["train.max_steps=20", "eval.every_steps=10", "train.log_every_steps=1000"])
    report = write_report([tmp_path / "run"], data=data, out=tmp_path / "report.html")
    control = tmp_path / "control.html"
    control.write_text('<!doctype html><body><img src="http://198.51.100.7/x.png">'
                       '<script>console.error("control error")</script></body>')

    console, asked, _ = _open(control, tmp_path)
    assert any("control error" in line for line in console) and asked == ["http://198.51.100.7/x.png"]

    console, asked, shot = _open(report, tmp_path)
    assert console == [] and asked == []
    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]  # (H, W, 3) in [0, 1]
    drawn = (pixels.mean(axis=-1) < 0.9).mean()  # the share of non-white pixels: text, axes, curves
    assert pixels.shape[:2] == (2400, 1100) and drawn > 0.02, drawn
    assert np.isfinite(pixels).all()
