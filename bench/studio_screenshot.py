"""A screenshot of the web studio on real runs (the README's picture): starts `patchflow serve` on the runs, asks
the page for samples of each run as a user would, and saves the page. Needs Chromium and playwright, as the
browser tests do.

    python bench/studio_screenshot.py runs/demo-color-digits runs/demo-moving-digits --out docs/studio_demo.png \
        --prompt "a green 4 on a black background, in the center" --prompt "a red 7 moving left on a black background"
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from browser import chromium_page  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--prompt", action="append", default=[], help="one per run, in order (text and video runs)")
    p.add_argument("--n", type=int, default=4, help="samples per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/studio_demo.png")
    p.add_argument("--port", type=int, default=7871)
    args = p.parse_args()
    server = subprocess.Popen([sys.executable, "-m", "patchflow", "serve", *args.runs, "--port", str(args.port)])
    url = f"http://127.0.0.1:{args.port}/"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "api/runs", timeout=60).read()
                break
            except OSError:
                time.sleep(0.1)
        with chromium_page(1280, 900) as page:
            page.goto(url)
            page.wait_for_selector("body[data-ready='1']")
            names = page.eval_on_selector_all("#run option", "o => o.map(e => e.value)")
            done = 0
            for name, prompt in zip(names, args.prompt + [None] * len(names)):
                page.select_option("#run", name)
                if prompt is not None:
                    page.fill("#prompt", prompt)
                page.fill("#n", str(args.n))
                page.fill("#seed", str(args.seed))
                page.click("#generate")
                done += args.n
                page.wait_for_function(f"document.querySelectorAll('#gallery figure').length >= {done}",
                                       timeout=600_000)
            page.wait_for_timeout(500)  # the last GIFs decode
            page.screenshot(path=args.out, full_page=True)
        print(f"wrote {args.out}")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
