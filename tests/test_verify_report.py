"""`kai-attest verify --report FILE.html`: one self-contained page, verdict first, plots as inline
SVG, bundle strings escaped; rendered in headless Chromium to prove it draws."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from bundlefactory import DERIVER, make_bundle

import attest.verify as verify
from attest.cli import main
from attest.verify.report import render_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(autouse=True)
def test_deriver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(verify.DERIVERS, DERIVER, "bundlefactory")


def report_of(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str, **bundle_kw: object) -> tuple[int, str, Path]:
    root, key = make_bundle(tmp_path / "bundle", **bundle_kw)
    out = tmp_path / "report.html"
    rc = main(["verify", str(root), "--report", str(out), "--trust", str(key.parent / "signing-key.pub.pem"), *args])
    capsys.readouterr()
    return rc, out.read_text(encoding="utf-8"), out


def test_report_puts_the_verdict_first_and_draws_every_plot(tmp_path: Path, capsys) -> None:
    rc, page, _ = report_of(tmp_path, capsys)
    assert rc == 4  # every check holds; the synthetic run has no replay implementation: nothing recomputed
    body = page.split("<body>", 1)[1]
    assert body.index('id="verdict"') < body.index("<h2>Checks</h2>") < body.index("<svg")
    assert ">INCOMPLETE — not a pass<" in page and "0 of 6 segments replayed" in page
    assert page.count("<svg") == 3  # loss, update norms, data by source and licence
    assert "not run" in page  # the replay table
    for check in ("trajectory", "release", "data-lineage", "data-licence", "genesis"):
        assert f'<td class="c"><code>{check}</code>' in page


def test_report_is_self_contained_and_escapes_what_the_bundle_says(tmp_path: Path, capsys) -> None:
    evil = '<script>alert(1)</script><img src="https://evil.example/x.png">'
    rc, page, _ = report_of(tmp_path, capsys, licence=evil)
    assert rc == 4
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert "default-src 'none'" in page  # and the page forbids fetching anything anyway


def test_report_of_a_failing_bundle_marks_the_flagged_segments(tmp_path: Path, capsys) -> None:
    rc, page, _ = report_of(tmp_path, capsys, swap_at=6)
    assert rc == 1
    assert ">FAIL<" in page and "trajectory" in page.split("</div>", 3)[2]
    assert page.count('fill="#cf222e"') == 2  # the two segments into and out of the swapped weights


def test_render_survives_hostile_facts() -> None:
    rep = verify.Report("b", [verify.Finding("release", False, "<f>", "<e>", "<g>")], ["<n>"], "identity",
                        {"checkpoints": [{"step": "NaN", "loss": float("inf")}, {"step": 2, "loss": None}],
                         "trajectory": [{"segment": "<s>", "update_norm": float("nan"), "flags": ["jump"]}],
                         "data": [{"source": None, "license": ["x"], "rows": -5}]})
    page = render_html(rep)
    assert "&lt;f&gt;" in page and "<f>" not in page
    json.loads(rep.to_json(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_staged_data_is_summarized_per_source_and_bars_count_only_the_shards_trained_on() -> None:
    def row(stage: str, rows: int, counts: dict, trained: bool = False, source: str = "web") -> dict:
        return {"shard": f"data/{stage}/{source}.parquet", "source": source, "license": "CC-BY-4.0", "collection": "crawl",
                "rows": rows, "generator": None, "stage": stage, "counts": counts, "trained": trained}

    data = [row("ingest", 90, {"empty": 7, "bad-json": 3}), row("dedup", 70, {"exact-duplicate": 15, "near-duplicate": 5}),
            row("pack", 40, {}, trained=True)]
    page = render_html(verify.Report("b", [], [], "identity", {"data": data}))
    summary = re.sub(r"<[^>]+>", " ", page[page.index("raw items read"):]).split()
    assert summary[summary.index("web"):][:6] == ["web", "100", "10", "20", "70", "40"]
    assert "40 rows" in page and "200 rows" not in page  # the bar counts the 40 packed rows, not every stage


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(tmp_path: Path, capsys) -> None:
    import numpy as np
    Image = pytest.importorskip("PIL.Image", reason="the train extra; not on the evaluator's light install")

    _, _, html_file = report_of(tmp_path, capsys, swap_at=6)
    shot = tmp_path / "report.png"
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
         f"file://{html_file}"],
        check=True, capture_output=True, timeout=120,
    )
    assert shot.stat().st_size > 20_000
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 2000)
    assert all(lo < hi for lo, hi in img.getextrema())  # not one colour
    top = np.asarray(img.crop((0, 0, 1200, 400))).astype(int)
    red = int(((top[..., 0] > 180) & (top[..., 1] < 60) & (top[..., 2] < 70)).sum())
    assert red > 20_000  # the FAIL verdict banner is drawn at the top
