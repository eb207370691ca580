"""How long `patchflow serve` takes to start: from launching the process to (1) the page answering and (2) the
runs loaded (GET /api/runs answers), then (3) the first sample served, over several starts.

    python bench/serve_startup.py runs/demo-color-digits [RUN ...] [--starts 5] [--port 7870]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request


def wait_for(url: str, deadline: float, data: bytes | None = None) -> float:
    while time.perf_counter() < deadline:
        try:
            req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                r.read()
                return time.perf_counter()
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.02)
    raise TimeoutError(f"{url} did not answer")


def one_start(runs: list[str], port: int, body: dict) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "patchflow", "serve", *runs, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        page = wait_for(base + "/", t0 + 120) - t0
        loaded = wait_for(base + "/api/runs", t0 + 300) - t0
        first = wait_for(base + "/api/generate", t0 + 600, json.dumps(body).encode()) - t0
        return page, loaded, first
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--starts", type=int, default=5)
    p.add_argument("--port", type=int, default=7870)
    p.add_argument("--prompt", default="a red 7 on a black background, in the center",
                   help="the first request's prompt (text runs); class runs get label 7")
    args = p.parse_args()
    from patchflow.pipeline import load_run_config

    cfg = load_run_config(args.runs[0])
    body = {"prompt": args.prompt} if cfg.is_text_run else {"label": 7}
    times = [one_start(args.runs, args.port, body) for _ in range(args.starts)]
    for name, values in zip(("page answers", "runs loaded", "first sample served"), zip(*times)):
        print(f"{name:>20}: median {statistics.median(values):.2f} s, min {min(values):.2f}, max {max(values):.2f} "
              f"over {len(values)} starts")


if __name__ == "__main__":
    main()
