"""The report's figures: the numbers behind them (series, loss by timestep bins and quarters) and the matplotlib
plots, each returned as PNG bytes. matplotlib is imported inside the functions, on its own Agg canvas (no pyplot).
"""
from __future__ import annotations

import io
import math

from patchflow.report.run_files import TIMESTEP_BINS


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
