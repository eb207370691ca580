"""Shared by the end-to-end run tests (text-to-image, text-to-video): the CLI in-process and a run's log."""
import json
from pathlib import Path

from patchflow.cli import main


def cli(args, capsys):
    """(exit code, stdout + stderr) of `patchflow ARGS` run in this process."""
    code = main(args)
    out = capsys.readouterr()
    return code, out.out + out.err


def read_log(run):
    return [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]
