"""`kai-attest verify --report FILE.html`: one self-contained page an evaluator can file or mail.

The verdict comes first, then the table of checks, then plots drawn here as inline SVG (no
scripts, no external assets, no plotting library): the loss at each checkpoint, the update norm
of each segment against its AdamW bound with flagged segments in red, the replay results, and
the training data by source and licence. Every string that came from the bundle is escaped:
a bundle is hostile input and so is anything it names.
"""

from __future__ import annotations

import html
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from attest.verify import Report

W, H = 520, 240  # plot size in CSS pixels
PAD_L, PAD_R, PAD_T, PAD_B = 64, 16, 16, 40
OK, BAD, SKIP, INK, GRID = "#1a7f37", "#cf222e", "#9a6700", "#24292f", "#d0d7de"
PALETTE = ("#0969da", "#8250df", "#1a7f37", "#bf8700", "#cf222e", "#57606a", "#1b7c83", "#a40e26")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#24292f;margin:24px auto;max-width:1100px;padding:0 16px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.verdict{border-radius:8px;padding:16px 20px;margin:12px 0 8px;color:#fff}
.verdict b{font-size:26px;display:block}
.pass{background:#1a7f37}.fail{background:#cf222e}.partial{background:#9a6700}
table{border-collapse:collapse;width:100%;font-size:13px;table-layout:fixed}
th,td{border:1px solid #d0d7de;padding:4px 6px;text-align:left;vertical-align:top;overflow-wrap:anywhere;word-break:break-word}
th{background:#f6f8fa} td.s{font-weight:600;white-space:nowrap} .ok{color:#1a7f37}.FAIL{color:#cf222e}.SKIP{color:#9a6700}
code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace;word-break:break-all} td.c code{word-break:normal;white-space:nowrap}
.plots{display:flex;flex-wrap:wrap;gap:16px} figure{margin:0} figcaption{font-size:12px;color:#57606a;max-width:520px}
.muted{color:#57606a}
"""


def _text(x: Any) -> str:
    """str(x) that always encodes as UTF-8: lone surrogates become `\\udXXX` escapes, and an integer
    too long for str() (the interpreter's digit limit) is described instead of printed."""
    try:
        s = x if isinstance(x, str) else str(x)
    except ValueError:  # int above sys.get_int_max_str_digits()
        return f"<an integer of {x.bit_length()} bits>" if isinstance(x, int) else "<unprintable value>"
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _e(x: Any) -> str:
    return html.escape(_text(x), quote=True)


MAX_CELL_CHARS = 300  # a bundle string longer than this is cut in a table cell (the full text is in its tooltip)


def _cell(x: Any, limit: int = MAX_CELL_CHARS) -> str:
    """A table cell's text: escaped, wrapped by the CSS anywhere, and cut after `limit` characters
    with the count of what was left out (a 3,000-character licence keeps the columns on screen)."""
    s = _text(x)
    if len(s) <= limit:
        return html.escape(s, quote=True)
    return (f'<span title="{html.escape(s[:4000], quote=True)}">{html.escape(s[:limit], quote=True)}</span>'
            f'<span class="muted">… ({len(s) - limit:,} more characters)</span>')


def _num(x: Any) -> float | None:
    """A finite float for plotting, or None (non-numbers, bools, non-finite, ints beyond a double)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except OverflowError:
        return None
    return v if math.isfinite(v) else None


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def _frame(xlabel: str, ylabel: str, ylo: float, yhi: float, title: str) -> list[str]:
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="{_e(title)}">',
           f'<rect width="{W}" height="{H}" fill="#fff"/>']
    for t in _ticks(ylo, yhi):
        y = _y(t, ylo, yhi)
        out.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}"/>')
        out.append(f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end" fill="{INK}">{_fmt(t)}</text>')
    out.append(f'<line x1="{PAD_L}" x2="{PAD_L}" y1="{PAD_T}" y2="{H - PAD_B}" stroke="{INK}"/>')
    out.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{H - PAD_B}" y2="{H - PAD_B}" stroke="{INK}"/>')
    out.append(f'<text x="{(PAD_L + W - PAD_R) / 2}" y="{H - 6}" font-size="12" text-anchor="middle" fill="{INK}">{_e(xlabel)}</text>')
    out.append(f'<text transform="translate(14 {(PAD_T + H - PAD_B) / 2}) rotate(-90)" font-size="12" text-anchor="middle" fill="{INK}">{_e(ylabel)}</text>')
    return out


def _y(v: float, lo: float, hi: float) -> float:
    span = hi - lo or 1.0
    return H - PAD_B - (v - lo) / span * (H - PAD_T - PAD_B)


def _x(v: float, lo: float, hi: float) -> float:
    span = hi - lo or 1.0
    return PAD_L + (v - lo) / span * (W - PAD_L - PAD_R)


def line_chart(series: Mapping[str, Sequence[tuple[float, float]]], xlabel: str, ylabel: str, title: str) -> str:
    pts = [p for s in series.values() for p in s]
    if not pts:
        return f'<p class="muted">{_e(title)}: nothing recorded.</p>'
    xlo, xhi = min(p[0] for p in pts), max(p[0] for p in pts)
    ylo, yhi = min(p[1] for p in pts), max(p[1] for p in pts)
    pad = (yhi - ylo) * 0.08 or abs(yhi) * 0.05 or 1.0
    ylo, yhi = ylo - pad, yhi + pad
    out = _frame(xlabel, ylabel, ylo, yhi, title)
    for x in sorted({p[0] for p in pts}):
        out.append(f'<text x="{_x(x, xlo, xhi):.1f}" y="{H - PAD_B + 14}" font-size="11" text-anchor="middle" fill="{INK}">{_fmt(x)}</text>')
    for i, (name, s) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        s = sorted(s)
        path = " ".join(f"{_x(x, xlo, xhi):.1f},{_y(y, ylo, yhi):.1f}" for x, y in s)
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        for x, y in s:
            out.append(f'<circle cx="{_x(x, xlo, xhi):.1f}" cy="{_y(y, ylo, yhi):.1f}" r="3" fill="{colour}"/>')
        out.append(f'<text x="{W - PAD_R - 4}" y="{PAD_T + 14 + 14 * i}" font-size="11" text-anchor="end" fill="{colour}">{_e(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def bar_chart(rows: Sequence[dict[str, Any]], title: str) -> str:
    """Update norm per segment (bars; red when flagged) and its bound (a tick above each bar)."""
    measured = [(_num(r.get("update_norm")), _num(r.get("update_bound")), bool(r.get("flags")), str(r.get("segment", ""))) for r in rows]
    vals = [(v, b, f, s) for v, b, f, s in measured if v is not None]
    if not vals:
        return f'<p class="muted">{_e(title)}: no segment measured.</p>'
    yhi = max(max(v[0], v[1] or 0.0) for v in vals) * 1.1 or 1.0
    out = _frame("segment", "‖W_k+1 − W_k‖", 0.0, yhi, title)
    n = len(vals)
    slot = (W - PAD_L - PAD_R) / n
    bw = max(2.0, min(40.0, slot * 0.6))
    for i, (v, bound, flagged, label) in enumerate(vals):
        cx = PAD_L + slot * (i + 0.5)
        y = _y(v, 0.0, yhi)
        out.append(f'<rect x="{cx - bw / 2:.1f}" y="{y:.1f}" width="{bw:.1f}" height="{H - PAD_B - y:.1f}" fill="{BAD if flagged else PALETTE[0]}">'
                   f"<title>{_e(label)}: {_fmt(v)}{' (flagged)' if flagged else ''}</title></rect>")
        if bound is not None:
            by = _y(bound, 0.0, yhi)
            out.append(f'<line x1="{cx - bw / 2 - 3:.1f}" x2="{cx + bw / 2 + 3:.1f}" y1="{by:.1f}" y2="{by:.1f}" stroke="{INK}" stroke-width="2" stroke-dasharray="4 2"/>')
        if n <= 16:
            out.append(f'<text x="{cx:.1f}" y="{H - PAD_B + 14}" font-size="10" text-anchor="middle" fill="{INK}">{_e(label.replace("step ", ""))}</text>')
    out.append(f'<text x="{W - PAD_R - 4}" y="{PAD_T + 12}" font-size="11" text-anchor="end" fill="{INK}">dashed: AdamW bound · red: flagged</text>')
    out.append("</svg>")
    return "".join(out)


def stacked_bars(table: Sequence[dict[str, Any]], title: str) -> str:
    """Rows by source (one bar each), split by licence: the shards trained on when the run names
    them (a staged build declares each row once per stage), else every declared shard."""
    by_source: dict[str, dict[str, int]] = {}
    if any(r.get("trained") is True for r in table):
        table = [r for r in table if r.get("trained") is True]
    for r in table:
        rows: int = r["rows"] if isinstance(r.get("rows"), int) else 0
        d = by_source.setdefault(str(r.get("source")), {})
        d[str(r.get("license"))] = d.get(str(r.get("license")), 0) + max(0, rows)
    if not by_source:
        return f'<p class="muted">{_e(title)}: no data shard declared.</p>'
    licences = sorted({lic for d in by_source.values() for lic in d})
    colour = {lic: PALETTE[i % len(PALETTE)] for i, lic in enumerate(licences)}
    top = max(sum(d.values()) for d in by_source.values()) or 1
    bar_h, gap, left = 22, 10, 150
    h = PAD_T + len(by_source) * (bar_h + gap) + 24 + 16 * ((len(licences) + 3) // 4)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" role="img" aria-label="{_e(title)}">',
           f'<rect width="{W}" height="{h}" fill="#fff"/>']
    for i, (src, d) in enumerate(sorted(by_source.items())):
        y = PAD_T + i * (bar_h + gap)
        out.append(f'<text x="{left - 6}" y="{y + bar_h * 0.7:.1f}" font-size="12" text-anchor="end" fill="{INK}">{_e(src[:22])}</text>')
        x = float(left)
        for lic in licences:
            w = d.get(lic, 0) / top * (W - left - 70)
            if w > 0:
                out.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colour[lic]}"><title>{_e(src)} · {_e(lic)}: {d[lic]} rows</title></rect>')
                x += w
        out.append(f'<text x="{x + 4:.1f}" y="{y + bar_h * 0.7:.1f}" font-size="11" fill="{INK}">{sum(d.values())} rows</text>')
    ly = PAD_T + len(by_source) * (bar_h + gap) + 8
    for i, lic in enumerate(licences):
        lx, lyy = left + (i % 4) * 100, ly + (i // 4) * 16
        out.append(f'<rect x="{lx}" y="{lyy}" width="10" height="10" fill="{colour[lic]}"/>'
                   f'<text x="{lx + 14}" y="{lyy + 9}" font-size="11" fill="{INK}">{_e(lic[:14])}</text>')
    out.append("</svg>")
    return "".join(out)


def _checks_table(report: Report) -> str:
    rows = ["<table><tr><th>status</th><th>check</th><th>file</th><th>expected</th><th>found</th><th>detail</th></tr>"]
    for f in report.findings:
        status = "ok" if f.ok else "SKIP" if f.skipped else "FAIL"
        rows.append(f'<tr><td class="s {status}">{status}</td><td class="c"><code>{_e(f.check)}</code></td><td><code>{_cell(f.file)}</code></td>'
                    f"<td>{_cell(f.expected)}</td><td>{_cell(f.found)}</td><td>{_cell(f.detail)}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


def _replay_table(report: Report) -> str:
    found = [f for f in report.findings if f.check == "replay"]
    ran = [f for f in found if " (step " in f.file]  # one per replayed segment, in the order of facts["replay"]
    if not ran:
        why = found[0].detail if found else "replay not run"
        return (f'<table><tr><th>segment</th><th>result</th><th>detail</th></tr>'
                f'<tr><td>—</td><td class="s SKIP">not run</td><td>{_e(why)}</td></tr></table>')
    facts: list[Any] = report.facts["replay"] if isinstance(report.facts.get("replay"), list) else []
    modes = [f"{x.get('mode')} on {x.get('worlds')} rank(s)" + (
        f"; floor {x['tolerance'].get('floor_ratio', 0):.2g} of the update, margin {x['tolerance'].get('margin', 0):.3g}, "
        f"drift budget {x['tolerance'].get('drift_budget', 0):.2g}" if isinstance(x.get("tolerance"), dict)
        and "margin" in x["tolerance"] else "") for x in facts if isinstance(x, dict)]
    rows = ["<table><tr><th>segment</th><th>result</th><th>mode</th><th>expected</th><th>found</th><th>detail</th></tr>"]
    for i, f in enumerate(ran):
        status = "ok" if f.ok else "SKIP" if f.skipped else "FAIL"
        said = "reproduced" if f.ok else "not decided" if f.skipped else "differs"
        rows.append(f'<tr><td><code>{_cell(f.file)}</code></td><td class="s {status}">{said}</td>'
                    f"<td>{_e(modes[i] if i < len(modes) else '')}</td>"
                    f"<td>{_cell(f.expected)}</td><td>{_cell(f.found)}</td><td>{_cell(f.detail)}</td></tr>")
    rows.append("</table>")
    cov = report.facts.get("replay_coverage")
    if isinstance(cov, dict):
        esc = ", ".join(f"{p:.3g} (m={m})" for m, p in (cov.get("escape_probability") or {}).items()
                        if isinstance(p, (int, float)))
        drawn = " drawn by the evaluator's challenge" if report.facts.get("challenge") else ""
        rows.append(f"<p>{_e(cov.get('replayed'))} of {_e(cov.get('segments'))} segments replayed{drawn}; a forgery "
                    f"spanning m segments escapes with probability {_e(esc)}.</p>")
    return "".join(rows)


def _count(r: dict[str, Any]) -> int:
    counts: dict[str, Any] = r["counts"] if isinstance(r.get("counts"), dict) else {}
    return sum(v for v in counts.values() if isinstance(v, int) and not isinstance(v, bool))


def _rows(r: dict[str, Any]) -> int:
    return r["rows"] if isinstance(r.get("rows"), int) and not isinstance(r.get("rows"), bool) else 0


def _stage_summary(table: Sequence[dict[str, Any]]) -> str:
    """Per source, what each stage of a staged build kept, dropped and removed."""
    by: dict[str, dict[str, int]] = {}
    for r in table:
        stage = r.get("stage")
        if stage not in ("ingest", "dedup", "pack"):
            continue
        d = by.setdefault(str(r.get("source")), {"ingest": 0, "dropped": 0, "dedup": 0, "removed": 0, "pack": 0})
        d[stage] += _rows(r)
        if stage == "ingest":
            d["dropped"] += _count(r)
        elif stage == "dedup":
            d["removed"] += _count(r)
    if not by:
        return ""
    rows = ["<table><tr><th>source</th><th>raw items read</th><th>dropped at ingest</th><th>duplicates removed</th>"
            "<th>records kept</th><th>packed rows</th></tr>"]
    for src, d in sorted(by.items()):
        rows.append(f"<tr><td>{_cell(src)}</td><td>{d['ingest'] + d['dropped']}</td><td>{d['dropped']}</td><td>{d['removed']}</td>"
                    f"<td>{d['dedup']}</td><td>{d['pack']}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


def _data_table(table: Sequence[dict[str, Any]]) -> str:
    if not table:
        return ""
    rows = ["<table><tr><th>shard</th><th>stage</th><th>source</th><th>licence</th><th>collection</th><th>generator</th>"
            "<th>rows</th></tr>"]
    for r in table:
        mark = " (trained on)" if r.get("trained") is True else ""
        rows.append(f"<tr><td><code>{_cell(r.get('shard'))}</code>{mark}</td><td>{_cell(r.get('stage') or '—')}</td>"
                    f"<td>{_cell(r.get('source'))}</td><td>{_cell(r.get('license'))}</td>"
                    f"<td>{_cell(r.get('collection'))}</td><td>{_cell(r.get('generator') or '—')}</td>"
                    f"<td>{_cell(r.get('rows'))}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


def render_html(report: Report) -> str:
    facts = report.facts
    if not report.ok:
        cls, word = "fail", "FAIL"
        sub = f"{len(report.failed)} failing finding(s) in: " + ", ".join(sorted({f.check for f in report.failed}))
    elif report.trust == "integrity-only":
        cls, word = "partial", "INTEGRITY ONLY — not a pass"
        sub = "every check holds, but the signing key came from the bundle itself: who signed it is not established (use --trust or a policy)"
    elif report.verdict == "incomplete":
        cls, word = "partial", "INCOMPLETE — not a pass"
        sub = ("every check that ran holds, but not recomputed: " + "; ".join(report.not_recomputed)
               if report.not_recomputed else "every check of what the light bundle holds passes; held state not produced")
    else:
        cls, word = "pass", "PASS"
        sub = "every check holds, signatures by a trusted key"
    if report.ok:
        sub += "; " + report.coverage_line()
    if report.ok and report.skipped_checks:
        sub += "; skipped: " + ", ".join(report.skipped_checks)
    ckpts = facts.get("checkpoints") or []
    loss_series: dict[str, list[tuple[float, float]]] = {}
    for c in ckpts:
        for key in ("loss", "eval_text", "eval_image", "eval_audio"):
            x, y = _num(c.get("step")), _num(c.get(key))
            if x is not None and y is not None:
                loss_series.setdefault("train loss" if key == "loss" else key, []).append((x, y))
    traj_rows = facts.get("trajectory") or []
    data = facts.get("data") or []
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">",
        f"<title>kai-attest verify: {_e(word)}</title><style>{CSS}</style></head><body>",
        f"<h1>kai-attest verify</h1><div class=\"muted\"><code>{_e(report.bundle)}</code></div>",
        f'<div class="verdict {cls}" id="verdict"><b>{_e(word)}</b>{_e(sub)}</div>',
        "<h2>Checks</h2>", _checks_table(report),
    ]
    if report.notes:
        parts.append("<ul>" + "".join(f"<li class=\"muted\">{_e(n)}</li>" for n in report.notes) + "</ul>")
    parts += [
        "<h2>Training</h2><div class=\"plots\">",
        f"<figure>{line_chart(loss_series, 'step', 'loss', 'loss per checkpoint')}<figcaption>Loss recorded in each checkpoint "
        "statement (train loss of the last step; held-out loss per modality where an evaluation ran).</figcaption></figure>",
        f"<figure>{bar_chart(traj_rows, 'update norm per segment')}<figcaption>‖W<sub>k+1</sub> − W<sub>k</sub>‖ per checkpoint "
        "segment, streamed from the safetensors files; the dashed tick is the most AdamW can move the weights in that many steps. "
        "Red: flagged (a jump or an outlier against the run's own segments).</figcaption></figure>",
        "</div>",
        "<h2>Replay</h2>", _replay_table(report),
        "<h2>Data by source and licence</h2>",
        f"<figure>{stacked_bars(data, 'rows by source and licence')}<figcaption>Rows per declared source, coloured by SPDX licence.</figcaption></figure>",
        _stage_summary(data),
        _data_table(data),
        "</body></html>",
    ]
    return "\n".join(parts)


def write_html(report: Report, path: str | os.PathLike[str]) -> Path:
    """Render, then write atomically: a temp file in the same folder renamed over `path`. On any
    error the temp file is removed and `path` is left as it was."""
    path = Path(path)
    data = render_html(report).encode("utf-8", "backslashreplace")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a report is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
