"""`patchflow report RUN`: one self-contained HTML page of a training run.

The page shows the run's kind and size, its training curves (loss, gradient norm, learning rate, throughput, MFU,
loss by timestep), the sample grids written while it trained, its eval.json figures and demo grid, and its
config.toml. Every image is embedded as a data: URI and the CSS is inline, so the one file works offline and
still works when it is moved or mailed. Nothing here imports torch: a report of a big run is quick to write.

One job a file: `run_files` reads the run directory leniently (log.jsonl, config.toml, eval.json, sample grids),
`plots` draws the matplotlib figures, `page` writes the HTML. This module is the public face: import from here.
"""
from __future__ import annotations

from patchflow.report.page import build_report, write_report
from patchflow.report.plots import bin_means, first_quarter, last_quarter
from patchflow.report.run_files import (TIMESTEP_BINS, Log, Picture, check_run_dir, evenly_spaced, parse_log,
                                        read_config, read_eval, read_log)

__all__ = ["write_report", "build_report", "check_run_dir", "parse_log", "read_log", "read_config", "read_eval",
           "Log", "Picture", "evenly_spaced", "bin_means", "first_quarter", "last_quarter", "TIMESTEP_BINS"]
