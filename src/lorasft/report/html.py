"""report.html (one run) and compare.html (several): self-contained pages, no network, that open
from disk. Charts are inline SVG drawn here (a point's value shows on hover; a legend entry
toggles its line); everything comes from the run folder's results.json (and progress.json while a
run trains), so `lorasft report` rewrites the page for any run, old ones included."""

from __future__ import annotations

import base64
import difflib
import html
import json
import math
import re
from pathlib import Path
from typing import Any

from lorasft.config import Config
from lorasft.run_files import REPORT, RESULTS, read_json

CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uff00-\uffef]")
COLORS = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2", "#4b5563")

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI','Noto Sans CJK SC',sans-serif;margin:24px;
  color:#111;max-width:1200px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ddd;padding:3px 8px;
  vertical-align:top;text-align:left}th{background:#f5f5f5}
.changed td{background:#fff7d6}.muted{color:#666}.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#059669}.bad{color:#dc2626}del{background:#fecaca;text-decoration:none}
ins{background:#bbf7d0;text-decoration:none}pre{white-space:pre-wrap;margin:0;font:13px/1.4 ui-monospace,monospace}
svg text{font:11px system-ui,sans-serif}.legend span{cursor:pointer;margin-right:14px;user-select:none}
.legend span.off{opacity:.35}.sample td{max-width:360px}
"""

SCRIPT = """
document.querySelectorAll('.legend span').forEach(function(s){s.addEventListener('click',function(){
  s.classList.toggle('off');document.querySelectorAll('[data-series="'+s.dataset.series+'"]')
  .forEach(function(e){e.style.display=s.classList.contains('off')?'none':''});});});
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang=en><meta charset=utf-8><title>{esc(title)}</title>"
            f"<style>{STYLE}</style><body>{body}<script>{SCRIPT}</script></body></html>\n")  # fmt: skip


# --- charts ---------------------------------------------------------------------------------


def line_chart(series: list[dict], *, best: int | None = None, region: list | None = None,
               x_label: str = "step", y_label: str = "loss", chart_id: str = "c") -> str:  # fmt: skip
    """`series`: [{name, points: [(x, y)], color, dashed}]; `best`: a step marked with a line;
    `region`: [x0, x1] shaded (the overfitting region)."""
    pts = [p for s in series for p in s["points"] if p[1] is not None]
    if not pts:
        return "<p class=muted>no points logged</p>"
    w, h, left, right, top, bottom = 720, 300, 56, 16, 12, 36
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-9)
    y0 = min(y0, 0.0) if y0 >= 0 and y0 < 0.15 * y1 else y0

    def sx(x):
        return left + (x - x0) / (x1 - x0) * (w - left - right)

    def sy(y):
        return top + (1 - (y - y0) / (y1 - y0)) * (h - top - bottom)

    out = [f'<svg id="{esc(chart_id)}" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img">']
    if region:
        a, b = sx(region[0]), sx(region[1])
        out.append(f'<rect x="{a:.1f}" y="{top}" width="{max(b - a, 2):.1f}" height="{h - top - bottom}" '
                   'fill="#fee2e2"><title>overfitting region</title></rect>')  # fmt: skip
    decimals = max(0, math.ceil(-math.log10((y1 - y0) / 4)) + 1)  # ticks that differ
    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        out.append(f'<line x1="{left}" x2="{w - right}" y1="{sy(yv):.1f}" y2="{sy(yv):.1f}" stroke="#eee"/>'
                   f'<text x="{left - 6}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:.{decimals}f}</text>')  # fmt: skip
    for xv in sorted({round(x0 + (x1 - x0) * k / 5) for k in range(6)}):
        out.append(f'<text x="{sx(xv):.1f}" y="{h - bottom + 16}" text-anchor="middle">{xv}</text>')
    out.append(f'<text x="{(w + left) / 2:.0f}" y="{h - 4}" text-anchor="middle">{esc(x_label)}</text>'
               f'<text x="12" y="{(h - bottom) / 2:.0f}" transform="rotate(-90 12 {(h - bottom) / 2:.0f})" '
               f'text-anchor="middle">{esc(y_label)}</text>')  # fmt: skip
    if best is not None and x0 <= best <= x1:
        out.append(f'<line x1="{sx(best):.1f}" x2="{sx(best):.1f}" y1="{top}" y2="{h - bottom}" '
                   f'stroke="#059669" stroke-dasharray="4 3"><title>best step {best}</title></line>')  # fmt: skip
    legend = []
    for i, s in enumerate(series):
        color, key = s.get("color") or COLORS[i % len(COLORS)], f"{chart_id}-{i}"
        xy = [(sx(x), sy(y), x, y) for x, y in s["points"] if y is not None]
        dash = ' stroke-dasharray="6 4"' if s.get("dashed") else ""
        path = " ".join(
            f"{'M' if j == 0 else 'L'}{a:.1f},{b:.1f}" for j, (a, b, _, _) in enumerate(xy)
        )
        out.append(f'<g data-series="{key}"><path d="{path}" fill="none" stroke="{color}" '
                   f'stroke-width="1.8"{dash}/>')  # fmt: skip
        for a, b, x, y in xy:
            out.append(f'<circle class="pt" cx="{a:.1f}" cy="{b:.1f}" r="2.6" fill="{color}" '
                       f'data-x="{x}" data-y="{y:.6g}"><title>{esc(s["name"])}: step {x}, '
                       f"{y_label} {y:.4g}</title></circle>")  # fmt: skip
        out.append("</g>")
        legend.append(
            f'<span data-series="{key}" style="color:{color}">&#9632; {esc(s["name"])}</span>'
        )
    out.append("</svg>")
    return f"<div class=legend>{''.join(legend)}</div>" + "".join(out)


def bar_chart(counts: dict[str, int], label: str) -> str:
    if not counts:
        return "<p class=muted>not recorded</p>"
    w, h, bottom, top = 360, 150, 30, 14
    n, peak = len(counts), max(counts.values())
    bw = (w - 20) / n
    out = [
        f'<svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="{esc(label)}">'
    ]
    for i, (k, v) in enumerate(counts.items()):
        bh = (h - top - bottom) * v / peak
        x = 10 + i * bw
        out.append(f'<rect x="{x + 2:.1f}" y="{h - bottom - bh:.1f}" width="{bw - 4:.1f}" height="{bh:.1f}" '
                   f'fill="#2563eb"><title>{esc(k)} tokens: {v}</title></rect>'
                   f'<text x="{x + bw / 2:.1f}" y="{h - bottom - bh - 3:.1f}" text-anchor="middle">{v}</text>'
                   f'<text x="{x + bw / 2:.1f}" y="{h - bottom + 13}" text-anchor="middle">{esc(k)}</text>')  # fmt: skip
    out.append(
        f'<text x="{w / 2}" y="{h - 2}" text-anchor="middle">{esc(label)} (tokens)</text></svg>'
    )
    return "".join(out)


# --- text differences -----------------------------------------------------------------------


def units(text: str) -> list[str]:
    """Words and spaces for alphabetic text, one unit per character for CJK (no spaces there)."""
    return re.findall(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uff00-\uffef]|\s+|[^\s\u3040-\u30ff"
                      r"\u3400-\u9fff\uac00-\ud7af\uff00-\uffef]+", text)  # fmt: skip


def marked_diff(reference: str, answer: str) -> str:
    """`answer` with what the reference lacks in <ins> and what it left out in <del>."""
    a, b = units(reference), units(answer)
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op == "equal":
            out.append(esc("".join(b[j1:j2])))
            continue
        if i2 > i1:
            out.append(f"<del>{esc(''.join(a[i1:i2]))}</del>")
        if j2 > j1:
            out.append(f"<ins>{esc(''.join(b[j1:j2]))}</ins>")
    return "".join(out)


# --- sections -------------------------------------------------------------------------------


def flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_section(cfg: dict) -> str:
    defaults = flat(Config().model_dump(mode="json"))
    rows = []
    for key, value in flat(cfg).items():
        changed = key in defaults and defaults[key] != value
        shown = json.dumps(value, ensure_ascii=False)
        default = (
            f" <span class=muted>(default {esc(json.dumps(defaults[key]))})</span>"
            if changed
            else ""
        )
        rows.append(f"<tr{' class=changed' if changed else ''}><td>{esc(key)}</td>"
                    f"<td>{esc(shown)}{default}</td></tr>")  # fmt: skip
    n = sum("class=changed" in r for r in rows)
    return (f"<h2>Config</h2><p>{n} settings differ from lorasft's defaults (highlighted).</p>"
            f"<details><summary>all settings</summary><table>{''.join(rows)}</table></details>"
            f"<table>{''.join(r for r in rows if 'class=changed' in r)}</table>")  # fmt: skip


def data_section(data: dict) -> str:
    parts = ["<h2>Data</h2>"]
    for split in ("train_files", "eval_files"):
        info = data.get(split)
        if not info:
            continue
        files = ", ".join(f"{esc(Path(f['path']).name)} ({esc(f['format'])}, {f['records']} records)"
                          for f in info.get("files", []))  # fmt: skip
        parts.append(f"<p><b>{split.split('_')[0]}</b>: {files}; {info.get('records')} records kept, "
                     f"{info.get('skipped_bad', 0)} bad skipped, {info.get('duplicates_dropped', 0)} "
                     "duplicates dropped</p>")  # fmt: skip
        bad = info.get("bad_records") or []
        if bad:
            parts.append("<table><tr><th>bad record (file:line: what)</th></tr>"
                         + "".join(f"<tr><td>{esc(b)}</td></tr>" for b in bad[:50]) + "</table>")  # fmt: skip
    for split in ("train", "eval"):
        enc = data.get(split)
        if not enc:
            continue
        parts.append(
            f"<p><b>{split} sequences</b>: {enc['sequences']}, {enc['tokens']} tokens, "
            f"{enc['supervised_share']:.1%} of them in the loss; {enc['dropped_too_long']} dropped "
            f"as too long, {enc['truncated_prompt']} with the prompt truncated</p>"
        )
        if enc.get("dropped_too_long_sources"):
            parts.append(
                f"<p class=muted>dropped: {esc(', '.join(enc['dropped_too_long_sources'][:10]))}</p>"
            )
        if split == "train":
            parts.append(bar_chart(enc.get("prompt_lengths", {}), "prompt length")
                         + bar_chart(enc.get("response_lengths", {}), "response length"))  # fmt: skip
    return "".join(parts)


def loss_series(log_history: list[dict]) -> tuple[list, list]:
    train = [(r["step"], r["loss"]) for r in log_history if "loss" in r and "step" in r]
    evals = [(r["step"], r["eval_loss"]) for r in log_history if "eval_loss" in r]
    return train, evals


def curves_section(results: dict, chart_id: str = "loss") -> str:
    train, evals = loss_series(results.get("log_history", []))
    over = results.get("overfitting") or {}
    best = (results.get("train") or {}).get("best_step") or over.get("best_step")
    chart = line_chart([{"name": "train loss", "points": train},
                        {"name": "eval loss", "points": evals, "dashed": True}],
                       best=best, region=over.get("region"), chart_id=chart_id)  # fmt: skip
    verdict = over.get("reason", "")
    flag = (
        "<b class=bad>overfitting</b>"
        if over.get("overfitting")
        else "<b class=ok>no overfitting</b>"
    )
    return f"<h2>Loss curves</h2>{chart}<p>{flag}: {esc(verdict)}; best step {esc(best)}</p>"


METRICS = ("exact_match", "rouge_l", "chrf")


def metrics_section(ev: dict) -> str:
    if not ev:
        return "<h2>Evaluation</h2><p class=muted>no evaluation recorded</p>"
    rows = []
    for side in ("base", "tuned"):
        if side not in ev:
            continue
        ppl, gen = ev[side].get("perplexity") or {}, ev[side].get("generation") or {}
        rows.append(f"<tr><td>{side}</td><td class=num>{_f(ppl.get('loss'))}</td>"
                    f"<td class=num>{_f(ppl.get('perplexity'))}</td>"
                    + "".join(f"<td class=num>{_f(gen.get(m))}</td>" for m in METRICS) + "</tr>")  # fmt: skip
    head = "".join(f"<th>{m} (%)</th>" for m in METRICS)
    return (f"<h2>Base vs tuned</h2><table id=metrics><tr><th></th><th>loss</th><th>perplexity</th>"
            f"{head}</tr>{''.join(rows)}</table><p class=muted>{esc(ev.get('loss_on', ''))}</p>")  # fmt: skip


def _f(v) -> str:
    return "—" if v is None else f"{v:.4g}" if isinstance(v, float) else esc(v)


def samples_section(samples: list[dict]) -> str:
    if not samples:
        return ""
    rows = []
    for i, s in enumerate(samples, 1):
        ref = s.get("reference") or ""
        cells = [f"<td>{i}<br><span class=muted>{esc(Path(str(s.get('source', ''))).name)}</span></td>",
                 f"<td><pre>{esc(s.get('prompt', ''))}</pre></td>", f"<td><pre>{esc(ref)}</pre></td>"]  # fmt: skip
        for side in ("base", "tuned"):
            text = s.get(side)
            mark = (
                ""
                if text is None
                else ("<b class=ok>=</b> " if text.strip() == ref.strip() else "")
            )
            cells.append(
                "<td>—</td>"
                if text is None
                else f"<td>{mark}<pre>{marked_diff(ref, text)}</pre></td>"
            )
        rows.append(f"<tr class=sample>{''.join(cells)}</tr>")
    return ("<h2>Samples</h2><p class=muted>Differences from the reference: <ins>added</ins>, "
            "<del>missing</del> (per word, per character in CJK text).</p><table id=samples>"
            "<tr><th>#</th><th>prompt</th><th>reference</th><th>base</th><th>tuned</th></tr>"
            f"{''.join(rows)}</table>")  # fmt: skip


def long_section(long: dict | None, run_dir: Path | None = None) -> str:
    """Perplexity by length per model (a table) and the long-context plots, embedded."""
    if not long:
        return ""
    lengths = [str(n) for n in long.get("lengths", [])]
    ppl = long.get("perplexity") or {}
    head = "".join(f"<th>{esc(n)}</th>" for n in lengths)
    rows = "".join(f"<tr><td>{esc(label)}</td>" + "".join(
        f"<td class=num>{_f((by_len.get(n) or {}).get('perplexity'))}</td>" for n in lengths) + "</tr>"
        for label, by_len in ppl.items() if isinstance(by_len, dict))  # fmt: skip
    parts = [(f"<h2>Long context</h2><p>{esc(long.get('method'))}, factor {_f(long.get('factor'))}, "
             f"window {esc(long.get('original_window'))} to {esc(long.get('target_length'))} "
             f"tokens; protocol {esc(long.get('protocol'))}</p>"
             f"<table id=long><tr><th>perplexity</th>{head}</tr>{rows}</table>")]  # fmt: skip
    if long.get("card"):
        from lorasft.eval.long_card import card_lines

        items = "".join(f"<li>{esc(line)}</li>" for line in card_lines(long["card"]))
        parts.append(
            f"<h3>Report card: did the run use the longer context?</h3><ul id=card>{items}</ul>"
        )
    for name in long.get("plots") or []:
        png = run_dir / name if run_dir else None
        if png is not None and png.is_file():
            data = base64.b64encode(png.read_bytes()).decode()
            parts.append(
                f'<p><img alt="{esc(name)}" src="data:image/png;base64,{data}" width=640></p>'
            )
    return "".join(parts)


def run_report(results: dict, name: str, run_dir: Path | None = None) -> str:
    train = results.get("train") or {}
    head = (f"<h1>{esc(name)}</h1><p class=muted>{esc(train.get('global_step'))} steps, "
            f"{_f(train.get('train_seconds'))} s training, precision {esc(train.get('precision'))}, "
            f"base {esc(train.get('base_model'))}</p>")  # fmt: skip
    versions = results.get("versions") or {}
    foot = ("<h2>Versions and timings</h2><p>" + ", ".join(f"{esc(k)} {esc(v)}" for k, v in versions.items())
            + f"</p><p>evaluation {_f((results.get('eval') or {}).get('seconds'))} s</p>")  # fmt: skip
    body = (head + metrics_section(results.get("eval") or {}) + curves_section(results)
            + samples_section((results.get("eval") or {}).get("samples") or [])
            + long_section(results.get("long_context"), run_dir) + data_section(results.get("data") or {})
            + config_section(results.get("config") or {}) + foot)  # fmt: skip
    return page(f"lorasft report: {name}", body)


def finished_results(run_dir: Path) -> dict | None:
    """The run's results.json, or None while it has not finished (or the file cannot be read)."""
    return read_json(run_dir / RESULTS)


def read_results(run_dir: Path) -> dict:
    if not (run_dir / RESULTS).is_file():
        raise FileNotFoundError(f"{run_dir}: no {RESULTS} (the run has not finished)")
    results = finished_results(run_dir)
    if results is None:
        raise FileNotFoundError(f"{run_dir / RESULTS}: not readable JSON (damaged, or still being "
                                "copied)")  # fmt: skip
    return results


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / REPORT
    out.write_text(run_report(read_results(run_dir), run_dir.name, run_dir), encoding="utf-8")
    return out


# --- comparison -----------------------------------------------------------------------------


def compare_report(runs: list[tuple[str, dict]]) -> str:
    series = []
    for i, (name, res) in enumerate(runs):
        train, evals = loss_series(res.get("log_history", []))
        color = COLORS[i % len(COLORS)]
        series += [{"name": f"{name} train", "points": train, "color": color},
                   {"name": f"{name} eval", "points": evals, "color": color, "dashed": True}]  # fmt: skip
    rows = []
    for name, res in runs:
        ev, tr = res.get("eval") or {}, res.get("train") or {}
        tuned = ev.get("tuned") or {}
        gen, ppl = tuned.get("generation") or {}, tuned.get("perplexity") or {}
        rows.append(f"<tr><td>{esc(name)}</td><td class=num>{esc(tr.get('global_step'))}</td>"
                    f"<td class=num>{_f(tr.get('best_metric'))}</td><td class=num>{_f(ppl.get('loss'))}</td>"
                    + "".join(f"<td class=num>{_f(gen.get(m))}</td>" for m in METRICS)
                    + f"<td class=num>{_f(tr.get('train_seconds'))}</td></tr>")  # fmt: skip
    head = "".join(f"<th>{m} (%)</th>" for m in METRICS)
    metrics = (f"<table id=metrics><tr><th>run</th><th>steps</th><th>best eval loss</th><th>tuned loss</th>"
               f"{head}<th>train s</th></tr>{''.join(rows)}</table>")  # fmt: skip
    configs = [flat(res.get("config") or {}) for _, res in runs]
    keys = sorted({k for c in configs for k in c})
    differ = [
        k
        for k in keys
        if len({json.dumps(c.get(k)) for c in configs}) > 1 and not k.startswith("output.")
    ]
    diff = "".join(f"<tr><td>{esc(k)}</td>" + "".join(f"<td>{esc(json.dumps(c.get(k), ensure_ascii=False))}</td>"
                                                     for c in configs) + "</tr>" for k in differ)  # fmt: skip
    names = "".join(f"<th>{esc(n)}</th>" for n, _ in runs)
    samples = _compare_samples(runs)
    body = (f"<h1>Comparison of {len(runs)} runs</h1><h2>Metrics</h2>{metrics}<h2>Loss curves</h2>"
            f"{line_chart(series, chart_id='cmp')}<h2>Config differences</h2>"
            f"<table id=config-diff><tr><th>setting</th>{names}</tr>{diff}</table>{samples}")  # fmt: skip
    return page("lorasft comparison", body)


def _compare_samples(runs: list[tuple[str, dict]]) -> str:
    lists = [(n, (r.get("eval") or {}).get("samples") or []) for n, r in runs]
    if not all(s for _, s in lists):
        return ""
    by_prompt = [{s["prompt"]: s for s in samples} for _, samples in lists]
    prompts = [s["prompt"] for s in lists[0][1] if all(s["prompt"] in b for b in by_prompt)]
    rows = []
    for p in prompts[:32]:
        ref = by_prompt[0][p].get("reference") or ""
        cells = "".join(
            f"<td><pre>{marked_diff(ref, b[p].get('tuned') or '')}</pre></td>" for b in by_prompt
        )
        rows.append(f"<tr><td><pre>{esc(p)}</pre></td><td><pre>{esc(ref)}</pre></td>{cells}</tr>")
    names = "".join(f"<th>{esc(n)} (tuned)</th>" for n, _ in runs)
    return (f"<h2>Samples</h2><table><tr><th>prompt</th><th>reference</th>{names}</tr>"
            f"{''.join(rows)}</table>")  # fmt: skip


def write_compare(run_dirs: list[str | Path], out: str | Path) -> Path:
    runs = [(Path(d).name, read_results(Path(d))) for d in run_dirs]
    out = Path(out)
    out.write_text(compare_report(runs), encoding="utf-8")
    return out
