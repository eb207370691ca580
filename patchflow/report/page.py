"""The report page: HTML cards, tables and the inline CSS, put together from the run's files (run_files) and
figures (plots), and written atomically. Every image is a data: URI, so the one file works offline.
"""
from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

from patchflow.report.plots import (bin_means, first_quarter, last_quarter, loss_by_t_rows, plot_loss,
                                    plot_loss_by_t, plot_loss_by_t_heatmap, plot_optimizer, plot_throughput)
from patchflow.report.run_files import (KINDS, TIMESTEP_BINS, Log, Picture, check_run_dir, evenly_spaced,
                                        model_kind, parameter_count, read_config, read_eval, read_log,
                                        read_picture, sample_files)

MAX_SAMPLE_GRIDS = 12        # sample grids shown at most (evenly spaced, the last one always)
GRID_MIN_WIDTH = 320         # sample grids narrower than this are shown at a whole multiple of their size


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def img_tag(data: bytes, mime: str, alt: str, css: str = "", size: tuple[int, int] | None = None) -> str:
    """An <img> holding its picture inline; width/height given when known (why: the page does not jump while it
    lays out)."""
    dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
    cls = f' class="{css}"' if css else ""
    return f'<img{cls} src="{data_uri(data, mime)}" alt="{html.escape(alt)}"{dims}>'


def format_number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def is_rate(path: tuple[str, ...], value) -> bool:
    """A share to show as a percentage: a float in [0, 1] under a "rates" table or named like an accuracy or a
    rate (why: not every float in [0, 1] is a share; a Frechet distance or a jitter can be one too)."""
    if isinstance(value, bool) or not isinstance(value, float) or not 0 <= value <= 1:
        return False
    name = path[-1].lower() if path else ""
    return "rates" in path or "accuracy" in name or name.endswith(("rate", "_acc"))


def format_value(path: tuple[str, ...], value) -> str:
    """One eval.json leaf as text: rates as percentages, other numbers to 4 significant figures, lists of numbers
    joined."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return f"{100 * value:.1f}%" if is_rate(path, value) else format_number(value)
    if isinstance(value, list):
        return ", ".join(format_value(path, v) for v in value)
    return str(value)


def flatten(tree, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object]]:
    """Nested dicts (and lists of dicts) -> [(key path, leaf)], in file order. Lists of plain values stay one leaf."""
    if isinstance(tree, dict):
        return [row for key, value in tree.items() for row in flatten(value, path + (str(key),))]
    if isinstance(tree, list) and any(isinstance(v, (dict, list)) for v in tree):
        return [row for i, value in enumerate(tree) for row in flatten(value, path + (f"[{i}]",))]
    return [(path, tree)]


def eval_tables(figures: dict) -> list[tuple[str, list[tuple[str, str]], list[tuple[str, str]]]]:
    """eval.json as (title, [(key path, value)], [(key path, preformatted text)]) tables: one per top-level table,
    one "summary" for the top-level values. Multi-line strings (the evaluators' own text tables) are kept as
    preformatted blocks."""
    summary = {k: v for k, v in figures.items() if not isinstance(v, dict)}
    groups = ([("summary", summary)] if summary else []) + [(k, v) for k, v in figures.items() if isinstance(v, dict)]
    tables = []
    for title, tree in groups:
        rows, blocks = [], []
        for path, value in flatten(tree):
            label = " / ".join(path)
            if isinstance(value, str) and "\n" in value:
                blocks.append((label, value))
            else:
                rows.append((label, format_value(path, value)))
        tables.append((title, rows, blocks))
    return tables


def eval_html(figures: dict) -> str:
    parts = []
    for title, rows, blocks in eval_tables(figures):
        body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
        parts.append(f'<div class="card"><h3>{html.escape(str(title))}</h3>'
                     + (f'<table class="kv">{body}</table>' if rows else "")
                     + "".join(f"<p class=\"note\">{html.escape(k)}</p><pre>{html.escape(v)}</pre>" for k, v in blocks)
                     + "</div>")
    return f'<div class="grid">{"".join(parts)}</div>'


def figure_card(png: bytes, alt: str, span: str = "") -> str:
    """A plot in a card; span "wide" (the whole row) or "span2" (two columns of a wide page)."""
    return f'<figure class="{f"card {span}".strip()}">{img_tag(png, "image/png", alt, "plot")}</figure>'


def picture_card(picture: Picture, alt: str, caption: str, attrs: str = "", wide: bool = False) -> str:
    """A sample or demo grid in a card, captioned; `attrs` are extra (trusted) attributes of the card."""
    scale = max(1, GRID_MIN_WIDTH // picture.width)  # why: tiny grids (32 px digits) shown larger, pixels kept sharp
    image = img_tag(picture.data, picture.mime, alt, "grid", (picture.width * scale, picture.height * scale))
    return (f'<figure class="card{" wide" if wide else ""}"{attrs}>{image}'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def curves_html(records: list[dict]) -> str:
    """The training-curve plots, or the sentence that there are none yet."""
    if not records:
        return '<p class="empty">No training steps logged yet (log.jsonl has no records).</p>'
    return ('<div class="grid">' + figure_card(plot_loss(records), "training loss against step", "wide")
            + figure_card(plot_optimizer(records), "gradient norm and learning rate against step", "wide")
            + figure_card(plot_throughput(records), "throughput and MFU against step", "wide") + "</div>")


def loss_by_t_html(records: list[dict], codec_run: bool = False) -> str:
    """Loss by timestep: bar plot, heatmap and the numbers; or why there are none."""
    if not records:
        return '<p class="empty">No training steps logged yet.</p>'
    rows = loss_by_t_rows(records)
    if not rows and codec_run:
        return '<p class="empty">Loss by timestep was not logged in this run: a codec (autoencoder) run has none.</p>'
    if not rows:
        return ('<p class="empty">Loss by timestep was not logged in this run (its log.jsonl records have no '
                '<code>loss_by_t</code>; runs trained with a newer patchflow log it).</p>')
    last = bin_means(last_quarter(rows))
    first = bin_means(first_quarter(rows)) if len(rows) >= 2 else None
    cells = "".join(f"<tr><th>{b / TIMESTEP_BINS:.1f} &ndash; {(b + 1) / TIMESTEP_BINS:.1f}</th>"
                    f"<td>{'&ndash;' if v is None else format_number(v)}</td></tr>" for b, v in enumerate(last))
    table = (f'<div class="card"><h3>Mean loss, last {len(last_quarter(rows))} of {len(rows)} log windows</h3>'
             f'<table class="kv"><tr><th>t / t_max</th><th>loss</th></tr>{cells}</table></div>')
    bars = figure_card(plot_loss_by_t(last, first), "mean loss per timestep bin", "span2")
    return ('<div class="grid">' + bars + table
            + figure_card(plot_loss_by_t_heatmap(rows), "loss per timestep bin over training", "wide") + "</div>")


def samples_html(run: Path) -> str:
    """Up to MAX_SAMPLE_GRIDS sample grids in step order, each captioned with its step (GIFs stay animated)."""
    found = sample_files(run)
    if not found:
        return '<p class="empty">No sample grids in samples/ (train.sample_every = 0, or none written yet).</p>'
    shown = evenly_spaced(found, MAX_SAMPLE_GRIDS)
    cards, unreadable = [], []
    for step, path in shown:
        picture = read_picture(path)
        if picture is None:
            unreadable.append(path.name)
            continue
        cards.append(picture_card(picture, f"samples at step {step}", f"step {step:,}", f' data-step="{step}"'))
    note = f"{len(shown)} of {len(found)} grids, evenly spaced." if len(shown) < len(found) else ""
    if unreadable:
        note += f" Not readable as PNG/GIF, left out: {', '.join(unreadable)}."
    return (f'<p class="note">{html.escape(note)}</p>' if note else "") + f'<div class="grid">{"".join(cards)}</div>'


def demo_html(run: Path) -> str:
    """demo_grid.png / demo_clips.gif written by `patchflow demo`, if present."""
    cards = []
    for name in ("demo_grid.png", "demo_clips.gif"):
        picture = read_picture(run / name)
        if picture is not None:
            cards.append(picture_card(picture, name, name, wide=True))
    return f'<div class="grid">{"".join(cards)}</div>' if cards else ""


def facts(run: Path, config: dict, log: Log) -> list[tuple[str, str]]:
    """The header's key figures, as (label, text)."""
    records = log.records
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    target = train.get("steps")
    last_step = records[-1]["step"] if records else None
    avgs = [r["loss_avg"] for r in records if r["loss_avg"] is not None]
    rows = []
    if isinstance(data.get("dataset"), str):
        rows.append(("data", data["dataset"]))
    rows.append(("steps logged", f"{len(records):,}" + (f" (last step {last_step:,}"
                 + (f" of {target:,}" if isinstance(target, int) else "") + ")" if records else "")))
    rows.append(("last loss_avg", format_number(avgs[-1]) if avgs else "none logged"))
    bad = max((r["bad_steps"] or 0 for r in records), default=0)  # a running total: the largest is the latest
    if bad:
        rows.append(("skipped steps", format_number(int(bad))))
    params = parameter_count(run / "model.safetensors")
    if params is not None:
        rows.append(("parameters", f"{params:,} ({params / 1e6:.2f} M)"))
    if (run / "codec").is_dir():
        rows.append(("codec", "codec/ (its own autoencoder, trained first)"))
    if log.bad_lines:
        rows.append(("log lines skipped", f"{len(log.bad_lines)} not JSON records (line "
                     f"{', '.join(map(str, log.bad_lines[:10]))}{', ...' if len(log.bad_lines) > 10 else ''})"))
    return rows


CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f4f5f7;color:#1d2329}
main{max-width:1280px;margin:0 auto;padding:24px}
h1{margin:0 0 4px;font-size:26px}h2{margin:32px 0 12px;font-size:20px;border-bottom:1px solid #d6d9de}
h3{margin:0 0 8px;font-size:15px}
.kind{color:#56606b;margin:0 0 12px}
.facts{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:0}
.facts dt{color:#56606b}.facts dd{margin:0;font-weight:600}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(380px,1fr));gap:16px}
.card{background:#fff;border:1px solid #dde0e4;border-radius:8px;padding:12px;margin:0;overflow:auto}
.wide{grid-column:1/-1}.span2{grid-column:span 2}
@media (max-width:820px){.span2{grid-column:1/-1}}
img{max-width:100%;height:auto;display:block;margin:0 auto}
img.grid{image-rendering:pixelated}
figcaption{text-align:center;color:#56606b;margin-top:6px;font-variant-numeric:tabular-nums}
table.kv{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
table.kv th,table.kv td{padding:3px 8px;border-bottom:1px solid #eef0f2;text-align:left;vertical-align:top}
table.kv th{font-weight:500;color:#3a434c}
pre{background:#f7f8fa;border:1px solid #e3e6ea;border-radius:6px;padding:10px;overflow:auto;font-size:13px}
.empty,.note{color:#56606b}
"""


def render(run: Path, config_text: str | None, config: dict, log: Log, figures: dict | None) -> str:
    """The whole page."""
    name = run.resolve().name or str(run)
    header = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in facts(run, config, log))
    codec_run = model_kind(config) == KINDS["autoencoder"]
    sections = [("Training curves", curves_html(log.records)),
                ("Loss by timestep", loss_by_t_html(log.records, codec_run)),
                ("Samples during training", samples_html(run))]
    if figures is not None:
        sections.append(("Evaluation (eval.json)", eval_html(figures)))
    demo = demo_html(run)
    if demo:
        sections.append(("Demo", demo))
    sections.append(("Config (config.toml)", f"<pre>{html.escape(config_text)}</pre>" if config_text is not None
                     else '<p class="empty">No config.toml in this run.</p>'))
    body = "".join(f"<section><h2>{html.escape(title)}</h2>{content}</section>" for title, content in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{html.escape(name)} &middot; patchflow report</title><style>{CSS}</style></head>"
            f"<body><main><h1>{html.escape(name)}</h1><p class=\"kind\">{html.escape(model_kind(config))}</p>"
            f'<dl class="facts">{header}</dl>{body}'
            f'<p class="note">Written by <code>patchflow report</code> from {html.escape(str(run.resolve()))}.</p>'
            f"</main></body></html>\n")


def build_report(run_dir: str | Path) -> str:
    """The report page of a run directory as HTML text."""
    run = check_run_dir(run_dir)
    config_text, config = read_config(run)
    log = read_log(run / "log.jsonl")
    return render(run, config_text, config, log, read_eval(run / "eval.json"))


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's self-contained HTML report to `out` (default RUN/report.html; a folder gets report.html in
    it) and return its path. Raises FileNotFoundError / ValueError, naming the fix, for a folder that is not a
    run directory."""
    run = check_run_dir(run_dir)
    path = run / "report.html" if out is None else Path(out)
    if path.is_dir():
        path = path / "report.html"
    if not path.parent.is_dir():  # checked before any plotting: a wrong --out fails at once
        raise FileNotFoundError(f"--out {path}: the folder {path.parent} does not exist; create it or pick another "
                                f"path")
    page = build_report(run)
    tmp = path.with_name(f".{path.name}.tmp")  # why: a reader never sees half a page
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
