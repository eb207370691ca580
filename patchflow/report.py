"""`patchflow report RUN`: one self-contained HTML page of a training run.

The page shows the run's kind and size, its training curves (loss, gradient norm, learning rate, throughput, MFU,
loss by timestep), the sample grids written while it trained, its eval.json figures and demo grid, and its
config.toml. Every image is embedded as a data: URI and the CSS is inline, so the one file works offline and
still works when it is moved or mailed. Nothing here imports torch: a report of a big run is quick to write.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LOG_FIELDS = ("loss", "loss_avg", "grad_norm", "lr", "images_per_s", "steps_per_s", "mfu", "bad_steps")
TIMESTEP_BINS = 10           # loss_by_t: equal bins of t / t_max over [0, 1]; train.run_log records with it
MAX_SAMPLE_GRIDS = 12        # sample grids shown at most (evenly spaced, the last one always)
GRID_MIN_WIDTH = 320         # sample grids narrower than this are shown at a whole multiple of their size
SAMPLE_NAME = re.compile(r"^step_(\d+)\.(png|gif)$")
KINDS = {"dit": "class-conditional image DiT", "mmdit": "text-to-image MMDiT",
         "crossdit": "text-to-image cross-attention DiT", "video": "text-to-video DiT",
         "autoencoder": "autoencoder (codec)"}
MIME = {"PNG": "image/png", "GIF": "image/gif"}


@dataclass
class Log:
    """log.jsonl read leniently: one record per step (the last one written wins), and the lines that were not
    records."""
    records: list[dict] = field(default_factory=list)
    bad_lines: list[int] = field(default_factory=list)


@dataclass
class Picture:
    """An image file ready to embed: its bytes, MIME type and pixel size."""
    data: bytes
    mime: str
    width: int
    height: int


# ---------------------------------------------------------------------------------------------------------- reading


def check_run_dir(run_dir: str | Path) -> Path:
    """The run folder, or an error that says what is wrong and what to pass instead."""
    run = Path(run_dir)
    if not run.exists():
        raise FileNotFoundError(f"{run}: no such folder; pass a run directory (the --out of `patchflow train`)")
    if not run.is_dir():
        raise NotADirectoryError(f"{run} is a file, not a run directory; pass the folder that holds its "
                                 f"config.toml and log.jsonl")
    if not (run / "config.toml").is_file() and not (run / "log.jsonl").is_file():
        raise ValueError(f"{run} is not a run directory: it has no config.toml and no log.jsonl; pass the folder "
                         f"given to `patchflow train --out` (e.g. runs/demo)")
    return run


def _number(value) -> float | None:
    """A finite float, or None (JSON null, NaN, a string): a plot gap rather than a crash."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _loss_bins(value) -> list[float | None] | None:
    """loss_by_t as TIMESTEP_BINS floats-or-None, or None when missing or malformed."""
    if not isinstance(value, list) or len(value) != TIMESTEP_BINS:
        return None
    return [_number(v) for v in value]


def _record(obj) -> dict | None:
    """A log record with its numbers checked, or None when `obj` is not one (no integer step)."""
    if not isinstance(obj, dict):
        return None
    step = obj.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return None
    record = {"step": step, "skipped": obj.get("skipped") is True}
    record.update({key: _number(obj.get(key)) for key in LOG_FIELDS})
    record["loss_by_t"] = _loss_bins(obj.get("loss_by_t"))
    return record


def parse_log(lines: list[str]) -> Log:
    """Records from log.jsonl's lines, by step. A resumed run may repeat steps (the last record wins); a line cut by
    a kill, or otherwise not a record, is counted in bad_lines (1-based) rather than failing the report."""
    by_step, bad = {}, []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = _record(json.loads(line))
        except (ValueError, RecursionError):
            record = None
        if record is None:
            bad.append(number)
        else:
            by_step[record["step"]] = record
    return Log([by_step[s] for s in sorted(by_step)], bad)


def read_log(path: Path) -> Log:
    """log.jsonl (an empty Log when the run has none yet), warning once about lines that were skipped."""
    if not path.is_file():
        return Log()
    log = parse_log(path.read_text(errors="replace").splitlines())
    if log.bad_lines:
        shown = ", ".join(map(str, log.bad_lines[:10])) + (", ..." if len(log.bad_lines) > 10 else "")
        warnings.warn(f"{path}: skipped {len(log.bad_lines)} line(s) that are not JSON log records (line {shown})",
                      stacklevel=2)
    return log


def read_config(run: Path) -> tuple[str | None, dict]:
    """config.toml's text (None if absent) and its parsed tables ({} if it does not parse: the page still shows
    the text)."""
    path = run / "config.toml"
    if not path.is_file():
        return None, {}
    text = path.read_text(errors="replace")
    try:
        return text, tomllib.loads(text)
    except (ValueError, RecursionError) as e:
        warnings.warn(f"{path}: not valid TOML ({e}); the report shows it as text only", stacklevel=2)
        return text, {}


def model_kind(config: dict) -> str:
    """What the run trains, from [model] arch (DiT when unset, as load_config reads it)."""
    model = config.get("model") if isinstance(config.get("model"), dict) else None
    if model is None:
        return "unknown (no readable config.toml)"
    arch = model.get("arch", "dit")
    return KINDS.get(arch, f"unknown arch {arch!r}") if isinstance(arch, str) else f"unknown arch {arch!r}"


def parameter_count(path: Path) -> int | None:
    """The number of values in a .safetensors file, read from its header only (no weights loaded); None when
    there is no such file or it cannot be read."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            return sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    except Exception:  # noqa: BLE001 - a damaged file only loses this one figure of the page
        return None


def read_picture(path: Path) -> Picture | None:
    """A PNG or GIF file as a Picture; None when it is missing or not a readable PNG/GIF."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            mime, (width, height) = MIME.get(image.format), image.size
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    return Picture(data, mime, width, height) if mime else None


def sample_files(run: Path) -> list[tuple[int, Path]]:
    """(step, file) of the run's samples/step_XXXXXXX.png|gif, by step."""
    folder = run / "samples"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := SAMPLE_NAME.match(p.name)) and p.is_file()]
    return sorted(found)


def evenly_spaced(items: list, k: int) -> list:
    """At most k of items, evenly spaced, the first and the last always kept (why: the start and the end of
    training are the grids one compares)."""
    if len(items) <= k:
        return list(items)
    if k == 1:
        return [items[-1]]
    picks = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in picks]


def read_eval(path: Path) -> dict | None:
    """eval.json as a dict; None when absent; a one-entry dict naming the problem when it is not readable JSON."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(errors="replace"))
    except (ValueError, RecursionError) as e:
        return {"error": f"eval.json is not valid JSON ({e})"}
    return data if isinstance(data, dict) else {"value": data}


# ------------------------------------------------------------------------------------------------- figures (data)


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one logged number, NaN where a record has none (why: matplotlib draws a gap there)."""
    return [r["step"] for r in records], [math.nan if r[key] is None else r[key] for r in records]


def has_values(records: list[dict], key: str) -> bool:
    return any(r[key] is not None for r in records)


def loss_by_t_rows(records: list[dict]) -> list[dict]:
    """The records that logged loss_by_t (older runs and records from before an upgrade have none)."""
    return [r for r in records if r["loss_by_t"] is not None]


def bin_means(rows: list[dict]) -> list[float | None]:
    """Per timestep bin, the mean of the logged window means over `rows` (bins never hit stay None)."""
    means = []
    for b in range(TIMESTEP_BINS):
        values = [r["loss_by_t"][b] for r in rows if r["loss_by_t"][b] is not None]
        means.append(sum(values) / len(values) if values else None)
    return means


def last_quarter(rows: list) -> list:
    """The last quarter of the windows (at least one): the loss by timestep the run ended with."""
    return rows[-max(1, len(rows) // 4):]


def first_quarter(rows: list) -> list:
    return rows[:max(1, len(rows) // 4)]


# ------------------------------------------------------------------------------------------------ figures (plots)


def _figure(width: float = 6.4, height: float = 3.6, ncols: int = 1):
    """A matplotlib Figure on its own Agg canvas (why: no pyplot, so neither its global figure list nor the
    process's backend is touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    return fig, axes


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _log_scale_if_positive(ax, *values: list[float]) -> None:
    """Log y when every finite value is > 0 (a loss is), else linear (why: log of <= 0 would hide points). Ticks
    read as plain numbers (1.9, 0.2), the in-between ones labelled only when the curve spans few decades."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    finite = [v for vs in values for v in vs if not math.isnan(v)]
    if not finite or min(finite) <= 0:
        return
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain if max(finite) / min(finite) < 30 else NullFormatter())


def plot_loss(records: list[dict]) -> bytes:
    """Loss (each logged step) and loss_avg (the window mean) against step, log y; skipped steps marked."""
    fig, ax = _figure(width=9.6, height=4.0)
    steps, loss = series(records, "loss")
    _, avg = series(records, "loss_avg")
    ax.plot(steps, loss, lw=0.8, alpha=0.45, label="loss (logged step)")
    ax.plot(steps, avg, lw=1.6, label="loss_avg (log window)")
    skipped = [r["step"] for r in records if r["skipped"]]
    if skipped:
        ax.vlines(skipped, 0, 1, transform=ax.get_xaxis_transform(), color="tab:red", lw=0.8, alpha=0.6,
                  label="skipped (non-finite) step")
    _log_scale_if_positive(ax, loss, avg)
    ax.set(xlabel="step", ylabel="loss", title="Training loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return _png(fig)


def plot_optimizer(records: list[dict]) -> bytes:
    """Global gradient norm (before clipping) and learning rate against step, side by side."""
    fig, (left, right) = _figure(width=9.6, ncols=2)
    left.plot(*series(records, "grad_norm"), lw=1.0, color="tab:purple")
    left.set(xlabel="step", ylabel="grad norm", title="Gradient norm")
    right.plot(*series(records, "lr"), lw=1.2, color="tab:green")
    right.set(xlabel="step", ylabel="learning rate", title="Learning rate")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return _png(fig)


def plot_throughput(records: list[dict]) -> bytes:
    """Items (images or clips) per second, steps per second where logged (newer runs), and MFU in percent."""
    fig, (left, right) = _figure(width=9.6, ncols=2)
    left.plot(*series(records, "images_per_s"), lw=1.0, color="tab:blue", label="images/s")
    left.set(xlabel="step", ylabel="images (or clips) per second", title="Throughput")
    if has_values(records, "steps_per_s"):
        twin = left.twinx()
        twin.plot(*series(records, "steps_per_s"), lw=1.0, color="tab:orange", label="steps/s")
        twin.set_ylabel("steps per second")
        lines = left.get_lines() + twin.get_lines()
        left.legend(lines, [line.get_label() for line in lines], fontsize="small")
    steps, mfu = series(records, "mfu")
    right.plot(steps, [100 * v for v in mfu], lw=1.0, color="tab:red")
    right.set(xlabel="step", ylabel="MFU (%)", title="Model FLOPs utilisation")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return _png(fig)


def bin_centres() -> list[float]:
    return [(b + 0.5) / TIMESTEP_BINS for b in range(TIMESTEP_BINS)]


def plot_loss_by_t(last: list[float | None], first: list[float | None] | None) -> bytes:
    """Mean loss per timestep bin at the end of training (bars), and at its start (markers) when there is one to
    compare (why: shows which noise levels the run learned)."""
    fig, ax = _figure()
    nan = [math.nan if v is None else v for v in last]
    ax.bar(bin_centres(), nan, width=0.9 / TIMESTEP_BINS, color="tab:blue", alpha=0.8,
           label="last quarter of the log windows")
    if first is not None:
        ax.plot(bin_centres(), [math.nan if v is None else v for v in first], "o--", color="tab:orange",
                label="first quarter")
    top = max([v for v in last + (first or []) if v is not None], default=1.0)
    ax.set(xlabel="t / t_max   (0 = clean data, 1 = pure noise)", ylabel="mean training loss",
           title="Loss by timestep", xlim=(0, 1), ylim=(0, 1.3 * top))  # headroom: the legend never hides a bar
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small", loc="upper left", ncols=2)
    return _png(fig)


def _edges(steps: list[int]) -> list[float]:
    """Cell edges around each step, half way to its neighbours (why: log steps need not be evenly spaced)."""
    if len(steps) == 1:
        return [steps[0] - 0.5, steps[0] + 0.5]
    mids = [(a + b) / 2 for a, b in zip(steps, steps[1:])]
    return [steps[0] - (mids[0] - steps[0])] + mids + [steps[-1] + (steps[-1] - mids[-1])]


def plot_loss_by_t_heatmap(rows: list[dict]) -> bytes:
    """Loss per timestep bin (rows) and log window (columns); blank where a bin had no samples in a window."""
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize

    steps = [r["step"] for r in rows]
    grid = np.array([[math.nan if v is None else v for v in r["loss_by_t"]] for r in rows], dtype=float).T
    cells = np.ma.masked_invalid(grid)
    # log colours only when the losses span more than a decade (why: a narrow log colour bar reads 1.9x10^0)
    norm = LogNorm() if cells.count() and cells.min() > 0 and cells.max() / cells.min() > 10 else Normalize()
    fig, ax = _figure(width=9.6)
    mesh = ax.pcolormesh(_edges(steps), [b / TIMESTEP_BINS for b in range(TIMESTEP_BINS + 1)], cells,
                         cmap="viridis", norm=norm, shading="flat")
    fig.colorbar(mesh, ax=ax, label="mean training loss")
    ax.set(xlabel="step", ylabel="t / t_max  (0 clean, 1 noise)", title="Loss by timestep over training")
    return _png(fig)


# ---------------------------------------------------------------------------------------------------------- HTML


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
