"""The lineage report as one self-contained HTML page: an inline SVG plot of -log10 p per component
and reference, then the table behind it. No scripts, fonts, images or links to fetch: the page reads
the same offline, archived, or attached to an evaluation."""

from __future__ import annotations

import html
import math
from pathlib import Path

from attest.lineage import CONTROL, ComponentResult, LineageReport

CAP = 40.0  # -log10 p above this is drawn at the cap, with its value printed
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
CONTROL_COLOUR = "#7f7f7f"


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def _plot(report: LineageReport) -> str:
    comps: list[str] = []
    for r in report.results:
        if r.component not in comps:
            comps.append(r.component)
    refs = [*report.references, *([CONTROL] if any(r.control for r in report.results) else [])]
    colour = {ref: (CONTROL_COLOUR if ref == CONTROL else COLOURS[k % len(COLOURS)]) for k, ref in enumerate(refs)}
    W, H, left, right, top, bottom = max(640, 156 + 56 * len(comps)), 360, 56, 100, 24, 120
    pw, ph = W - left - right, H - top - bottom

    def y(v: float) -> float:
        return top + ph * (1 - min(v, CAP) / CAP)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H + 24 * len(refs)}" '
           f'font-family="sans-serif" font-size="11" role="img" aria-label="-log10 p per component">']
    for v in range(0, int(CAP) + 1, 10):
        out.append(f'<line x1="{left}" x2="{W - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>'
                   f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v}</text>')
    out.append(f'<text x="14" y="{top + ph / 2:.0f}" transform="rotate(-90 14 {top + ph / 2:.0f})" '
               f'text-anchor="middle">-log10 p</text>')
    thresholds = {r.threshold for r in report.results if r.threshold and not r.control}
    for th in thresholds:
        ty = y(-math.log10(th))
        out.append(f'<line x1="{left}" x2="{W - right}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="#444" '
                   f'stroke-dasharray="5,4"/><text x="{W - right}" y="{ty - 4:.1f}" text-anchor="end" '
                   f'fill="#444">threshold alpha/m = {th:.1e}</text>')
    step = pw / max(1, len(comps))
    for i, comp in enumerate(comps):
        cx = left + step * (i + 0.5)
        out.append(f'<text x="{cx:.1f}" y="{top + ph + 10}" transform="rotate(45 {cx:.1f} {top + ph + 10})">'
                   f'{_e(comp)}</text>')
        rows = [r for r in report.results if r.component == comp]
        for k, ref in enumerate(refs):
            hit = next((r for r in rows if r.reference == ref), None)
            if hit is None:
                continue
            x = cx + (k - (len(refs) - 1) / 2) * min(10.0, step / (len(refs) + 1))
            tip = f"{comp} vs {ref}: {hit.verdict}" + (f", p={hit.p_value:.2e}" if hit.p_value is not None else "")
            if hit.p_value is None:
                out.append(f'<text x="{x:.1f}" y="{top + ph - 3}" text-anchor="middle" fill="#999">'
                           f'×<title>{_e(tip)}</title></text>')
                continue
            pv = -math.log10(hit.p_value)
            shape = (f'<path d="M{x - 5:.1f},{y(pv) + 4:.1f} L{x + 5:.1f},{y(pv) + 4:.1f} L{x:.1f},{y(pv) - 5:.1f} Z"'
                     if pv > CAP else f'<circle cx="{x:.1f}" cy="{y(pv):.1f}" r="4"')
            fill = colour[ref] if hit.verdict == "dependent" else "white"
            out.append(f'{shape} fill="{fill}" stroke="{colour[ref]}" stroke-width="1.5"><title>{_e(tip)}</title>'
                       f'{"</path>" if pv > CAP else "</circle>"}')
    for k, ref in enumerate(refs):
        ly = H + 16 + 24 * k - 8
        out.append(f'<circle cx="{left + 6}" cy="{ly}" r="4" fill="{colour[ref]}"/>'
                   f'<text x="{left + 16}" y="{ly + 4}">{_e(ref)}</text>')
    out.append(f'<text x="{W - right}" y="{H + 8}" text-anchor="end" fill="#555">filled: dependent; hollow: '
               f'no evidence of dependence, or a shared public genesis; ×: not comparable; ▲: -log10 p above '
               f'{CAP:.0f}</text>')
    out.append("</svg>")
    return "\n".join(out)


HIST_W, HIST_H, HIST_BINS = 220, 56, 24


def _histogram(r: ComponentResult) -> str:
    """The null draws of one row as a histogram, the observed statistic as a red line (inline SVG)."""
    if r.statistic is None or not r.null_values:
        return ""
    obs, null = r.statistic, r.null_values
    lo, hi = min(*null, obs), max(*null, obs)
    span = (hi - lo) or 1.0
    pad, base = 6.0, HIST_H - 14.0

    def x(v: float) -> float:
        return pad + (HIST_W - 2 * pad) * (v - lo) / span

    counts = [0] * HIST_BINS
    for v in null:
        counts[min(HIST_BINS - 1, int((v - lo) / span * HIST_BINS))] += 1
    top, bw = max(counts), (HIST_W - 2 * pad) / HIST_BINS
    out = [f'<svg class="null" xmlns="http://www.w3.org/2000/svg" width="{HIST_W}" height="{HIST_H}" '
           f'font-family="sans-serif" font-size="9" role="img" aria-label="null distribution and observed statistic">',
           f"<title>{len(null)} null draws, mean {r.null_mean:.4f}; observed {obs:.4f} (z {r.z:.1f})</title>",
           f'<line x1="{pad}" x2="{HIST_W - pad}" y1="{base}" y2="{base}" stroke="#999"/>']
    for k, c in enumerate(counts):
        if c:
            h = (base - 4) * c / top
            out.append(f'<rect class="bin" x="{pad + k * bw:.1f}" y="{base - h:.1f}" width="{max(bw - 1, 0.5):.1f}" '
                       f'height="{h:.1f}" fill="#9ab"><title>{c} draw(s)</title></rect>')
    out.append(f'<line class="observed" x1="{x(obs):.1f}" x2="{x(obs):.1f}" y1="2" y2="{base}" stroke="#d62728" '
               f'stroke-width="2"><title>observed {obs:.4f}</title></line>')
    out.append(f'<text x="{pad}" y="{HIST_H - 3}">{lo:.3f}</text>'
               f'<text x="{HIST_W - pad}" y="{HIST_H - 3}" text-anchor="end">{hi:.3f}</text>')
    out.append("</svg>")
    return "".join(out)


def _row(r: ComponentResult) -> str:
    cls = {"dependent": "dep", "independent": "ind", "shared initialisation": "shared"}.get(r.verdict, "nc")
    compared = [f"compared {', '.join(r.roles)}"] if r.roles else []
    matched = [f"matched to the reference's {r.matched} (the stacks' depths differ)"] if r.matched else []
    details = r.reason if r.verdict == "not comparable" else "; ".join(
        matched + ([r.reason] if r.shared_init else []) + compared + r.skipped)
    cells = [r.component, r.reference + (" [control]" if r.control else ""), r.verdict,
             _fmt(r.p_value, ".2e"), _fmt(r.threshold, ".1e"), _fmt(r.p_perm, ".3f"), _fmt(r.statistic, ".4f"),
             "" if r.null_mean is None else f"{r.null_mean:.4f} ± {r.null_sd:.4f}", _fmt(r.z, ".1f"),
             _fmt(r.raw_cosine, ".3f"), details]
    return (f'<tr class="{cls}">' + "".join(f"<td>{_e(c)}</td>" for c in cells)
            + f'<td class="hist">{_histogram(r)}</td></tr>')


def render_html(report: LineageReport) -> str:
    dep = report.dependent
    summary = (f"{len(dep)} component(s) dependent on a reference: " + ", ".join(
        f"{r.component} ← {r.reference}" for r in dep)) if dep else \
        "No component is dependent on any reference (absence of evidence, not proof of independence)."
    warn = "".join(f"<p class=warn>Positive control not dependent for {_e(r.component)}: an “independent” verdict "
                   "for that component carries no evidence.</p>" for r in report.control_failed)
    unmatched = "".join(f"<li>{_e(label)}: {_e(n)}</li>" for label, names in report.unmatched.items() for n in names)
    inherited = [r for r in report.results if r.shared_init]
    shared = (f"<p>{len(inherited)} component(s) inherited by both models from a public genesis "
              f"({_e(', '.join(sorted({r.shared_init for r in inherited})))}): shared initialisation, not evidence "
              "of copying and not counted as dependent.</p>") if inherited else ""
    head = ["component", "reference", "verdict", "p", "threshold", "p_perm", "statistic", "null mean ± sd", "z",
            "raw cosine (not used)", "details", "observed (red) against the null draws"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kai-attest lineage: {_e(report.candidate)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 12px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: top; }}
tr.dep td {{ background: #fde2e2; }} tr.nc td {{ color: #777; }} tr.shared td {{ background: #eef3fb; }}
.warn {{ color: #a40; }} .note {{ font-size: 13px; color: #444; max-width: 60em; }}
</style></head><body>
<h1>Lineage: {_e(report.candidate)}</h1>
<p>References: {_e(", ".join(report.references))}. Method: {_e(report.method)}; alpha {report.alpha:g} with a
Bonferroni correction over the comparable tests; {report.null_draws} null draws; seed {report.seed}.</p>
<p><strong>{_e(summary)}</strong></p>{warn}{shared}
{_plot(report)}
<table><tr>{"".join(f"<th>{_e(h)}</th>" for h in head)}</tr>
{"".join(_row(r) for r in report.results)}
</table>
{f"<h2>Tensors no layout rule matched</h2><ul>{unmatched}</ul>" if unmatched else ""}
<p class="note">A small p is evidence that the candidate's component was derived from the reference's weights
(fine-tuned, copied, permuted, rescaled or noised). A large p is absence of evidence, not proof of
independence; and weight tests cannot see distillation from a foreign teacher (data provenance covers that).
The raw cosine column is shown for contrast only: norm gains initialised at 1 have raw cosine near 1 between
unrelated models. Method and assumptions: docs/lineage.md.</p>
</body></html>
"""


def write_html(report: LineageReport, path: str | Path) -> Path:
    p = Path(path)
    p.write_text(render_html(report), encoding="utf-8")
    return p
