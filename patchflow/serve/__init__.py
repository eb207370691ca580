"""`patchflow serve`: a local web studio and an HTTP API over one or more runs (class, text-to-image, video).

- requests.py  the JSON body (GenerateRequest), checked against its run (resolve), the command that reproduces it
- runs.py      the runs served: their directories checked, their names, what each offers (ServedRun)
- studio.py    the one worker thread that owns the models and samples one request at a time from a bounded queue
               (Studio, Job); every sample is drawn on its own (n = 1, seed = seed + k), so `patchflow sample`
               reproduces it exactly
- http.py      the FastAPI app (build_app), its JSON errors, and the BodyLimit and TokenGate middlewares
- here         serve(): check the arguments and the port, load the runs, run uvicorn

Routes (JSON errors everywhere: {"error": message}; 4xx for a request's fault, the server keeps serving):
- GET  /                          the studio page
- GET  /api/runs                  the runs served and what each takes (waits until they are loaded)
- POST /api/generate              JSON body -> image/png (an image) or image/gif (a clip); n > 1: one grid
- POST /api/jobs                  the same body -> 202 {"id", "queue_position"} (the page's route: it shows progress)
- GET  /api/jobs/{id}             status, queue position, progress (steps done / total), items with their settings
- GET  /api/jobs/{id}/items/{k}   sample k of a finished job
- GET  /api/health                {"ok": true, "loaded": ..., "queued": ...}
"""
from __future__ import annotations

import re
import sys
import threading
import time
import warnings
from pathlib import Path

from patchflow.sample_request import RequestError
from patchflow.serve.http import MAX_BODY, WAIT_S, BodyLimit, TokenGate, build_app, validation_message
from patchflow.serve.requests import (INSTALL, LIMITS, MAX_FRAMES, MAX_GUIDANCE, MAX_N, MAX_SIDE, MAX_STEPS,
                                      MAX_UPLOAD, GenerateRequest, decode_image, reproduce_command, resolve)
from patchflow.serve.runs import ServedRun, check_runs, class_names, example_prompt, run_names
from patchflow.serve.studio import KEEP_JOBS, Job, Studio, encode, grid_bytes

__all__ = ["serve", "check_port", "build_app", "BodyLimit", "TokenGate", "validation_message", "Studio", "Job",
           "encode", "grid_bytes", "ServedRun", "check_runs", "run_names", "example_prompt", "class_names",
           "GenerateRequest", "RequestError", "decode_image", "resolve", "reproduce_command", "LIMITS", "MAX_N",
           "MAX_STEPS", "MAX_GUIDANCE", "MAX_FRAMES", "MAX_SIDE", "MAX_UPLOAD", "MAX_BODY", "KEEP_JOBS", "WAIT_S"]


def check_port(host: str, port: int) -> None:
    """Fail early, with a message, when the address is taken (uvicorn would only log it and exit)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port") from None


def serve(runs: list[str | Path], host: str = "127.0.0.1", port: int = 7860, device: str = "auto",
          max_queue: int = 32, use_ema: bool = True, token: str | None = None, loras: list[str] = ()) -> None:
    """Serve the studio until interrupted (Ctrl-C). token: the API needs it (TokenGate); None or "" = open."""
    try:
        import uvicorn
    except ImportError:
        raise ImportError(INSTALL) from None
    if not 1 <= port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    if max_queue < 1:
        raise ValueError(f"--max-queue must be >= 1, got {max_queue}")
    if token is not None and not re.fullmatch(r"[A-Za-z0-9._~-]{8,}", token):
        raise ValueError("--token must be at least 8 characters of A-Z a-z 0-9 . _ ~ - (it travels in a URL and a "
                         "cookie); e.g. python -c 'import secrets; print(secrets.token_urlsafe())'")
    if not token and host not in ("127.0.0.1", "localhost", "::1"):
        warnings.warn(f"serving on {host} without --token: anyone who reaches port {port} can sample the runs",
                      stacklevel=2)
    check_port(host, port)
    t0 = time.perf_counter()
    studio = Studio(runs, device=device, max_queue=max_queue, use_ema=use_ema, loras=loras)
    app = build_app(studio, token)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    page = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    print(f"patchflow serve: {len(studio.paths)} run(s) ({', '.join(studio.names)}); the studio at {page} , the API "
          f"at http://{shown}:{port}/api/generate" + (" (Authorization: Bearer TOKEN)" if token else ""), flush=True)

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))

    def ready() -> None:  # say when the models are in memory: the first request is then served at once
        studio.loaded.wait()
        for name, why in studio.unused_loras.items():  # another base's adapter, a corrupt file: said, not hidden
            print(f"patchflow serve: warning: --lora {name!r} fits none of the served runs and is not offered ({why})",
                  file=sys.stderr, flush=True)
        if studio.load_error is None:
            print(f"patchflow serve: ready ({time.perf_counter() - t0:.1f} s after start)", flush=True)
        else:  # a run that cannot load (missing weights, a codec gone): stop, rather than serve 503s
            server.should_exit = True

    threading.Thread(target=ready, daemon=True).start()
    server.run()
    if studio.load_error is not None:
        raise ValueError(studio.load_error)
