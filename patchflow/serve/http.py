"""The HTTP side of `patchflow serve`: the FastAPI app over a Studio (its routes, JSON errors everywhere), and two
ASGI middlewares: BodyLimit (a body over MAX_BODY gets 413 before it is read) and TokenGate (--token)."""
from __future__ import annotations

import traceback
from importlib.resources import files

from patchflow.sample_request import RequestError
from patchflow.serve.requests import MAX_UPLOAD, GenerateRequest
from patchflow.serve.studio import Studio, grid_bytes

MAX_BODY = 12 * 2**20     # bytes of a request body (the first frame in base64, and the rest)
WAIT_S = 900              # /api/generate gives up (504) after this long


def validation_message(errors: list[dict]) -> str:
    """pydantic's errors as one sentence per field: `steps: Input should be less than or equal to 250`."""
    parts = []
    for e in errors:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        msg = e.get("msg", "invalid")
        if e.get("type") == "extra_forbidden":
            msg = "unknown field (see GET /api/runs and the README for the fields)"
        elif e.get("type") == "json_invalid":
            where, msg = "body", f"not valid JSON ({e.get('ctx', {}).get('error', msg)})"
        elif e.get("type") == "model_attributes_type":
            msg = "the body must be a JSON object"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets a JSON 413 before the app reads it, whether its
    Content-Length says so or a chunked body grows past the limit (read up to it, then refused)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        size = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
        if size.isdigit() and int(size) > self.limit:
            return await self._refuse(scope, receive, send, f"{int(size) / 2**20:.1f} MiB")
        chunks, total = [], 0
        while True:  # buffer the body (at most `limit` bytes), then hand it on in one message
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > self.limit:
                return await self._refuse(scope, receive, send, f"over {self.limit / 2**20:.1f} MiB")
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the client's disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, size: str) -> None:
        from fastapi.responses import JSONResponse

        error = (f"the request body is {size}; at most {self.limit // 2**20} MiB (a first frame of up to "
                 f"{MAX_UPLOAD // 2**20} MiB, base64)")
        await JSONResponse({"error": error}, status_code=413)(scope, receive, send)


class TokenGate:
    """ASGI middleware: with a token, every /api/ request must carry it, as `Authorization: Bearer TOKEN` (scripts)
    or the cookie that opening /?token=TOKEN sets (the page, whose images are plain <img> requests); else a JSON
    401 that says how. The page itself and /api/health stay open (no samples, no runs named)."""

    COOKIE = "patchflow_token"

    def __init__(self, app, token: str):
        self.app, self.token = app, token.encode()

    def _offered(self, scope) -> dict[str, bool]:
        """Whether the header, the cookie and the query string each carry the token."""
        import hmac
        from http.cookies import CookieError, SimpleCookie
        from urllib.parse import parse_qs

        headers = dict(scope["headers"])
        bearer = headers.get(b"authorization", b"")
        try:
            cookie = SimpleCookie(headers.get(b"cookie", b"").decode("latin-1"))
        except CookieError:  # a malformed Cookie header carries no token
            cookie = SimpleCookie()
        query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
        offered = {"header": bearer[7:].strip() if bearer[:7].lower() == b"bearer " else b"",
                   "cookie": cookie[self.COOKIE].value.encode() if self.COOKIE in cookie else b"",
                   "query": query.encode()}
        return {k: hmac.compare_digest(v, self.token) for k, v in offered.items()}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from fastapi.responses import JSONResponse, Response

        path, offered = scope["path"], self._offered(scope)
        if path == "/" and offered["query"]:  # remember it for the page's own requests; drop it from the address
            cookie = f"{self.COOKIE}={self.token.decode()}; Path=/; HttpOnly; SameSite=Strict"
            return await Response(status_code=303, headers={"Location": "/", "Set-Cookie": cookie})(
                scope, receive, send)
        if path.startswith("/api/") and path != "/api/health" and not any(offered.values()):
            error = ("this server needs its token (patchflow serve --token): send the header 'Authorization: Bearer "
                     "TOKEN', or open /?token=TOKEN in the browser once")
            return await JSONResponse({"error": error}, status_code=401,
                                      headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        await self.app(scope, receive, send)


def build_app(studio: Studio, token: str | None = None):
    """The FastAPI app over a Studio; with a token, the API needs it (TokenGate)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="patchflow", docs_url="/api/docs", redoc_url=None, openapi_url="/api/openapi.json")
    page = files("patchflow").joinpath("web", "studio.html").read_text()  # package data

    @app.exception_handler(RequestError)
    def _request_error(request: Request, e: RequestError):
        retry = {"Retry-After": "5"} if e.status == 503 else None  # a full queue or runs still loading
        return JSONResponse({"error": str(e)}, status_code=e.status, headers=retry)

    @app.exception_handler(RequestValidationError)
    def _invalid(request: Request, e: RequestValidationError):
        return JSONResponse({"error": validation_message(e.errors())}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    def _http(request: Request, e: StarletteHTTPException):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code)

    @app.exception_handler(Exception)
    def _bug(request: Request, e: Exception):  # a JSON 500 at worst; the process keeps serving
        traceback.print_exception(e)
        return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, status_code=500)

    app.add_middleware(BodyLimit, limit=MAX_BODY)
    if token:
        app.add_middleware(TokenGate, token=token)  # added last, so it runs first: no body is read without it

    @app.get("/", response_class=HTMLResponse)
    def index():
        return page

    @app.get("/api/health")
    def health():
        return {"ok": studio.load_error is None, "loaded": studio.loaded.is_set(), "queued": studio.queue.qsize()}

    @app.get("/api/runs")
    def runs():
        return {"runs": studio.runs_info()}

    def media(data: bytes, media_type: str, settings: dict) -> Response:
        import json

        return Response(data, media_type=media_type,
                        headers={"X-Patchflow-Seed": str(settings["seed"]),
                                 "X-Patchflow-Settings": json.dumps({k: v for k, v in settings.items()
                                                                     if k != "command"})})

    @app.post("/api/generate")
    def generate(req: GenerateRequest):
        job = studio.submit(req)
        if not job.finished.wait(timeout=WAIT_S):
            raise RequestError(f"still queued or sampling after {WAIT_S} s; poll GET /api/jobs/{job.id}", 504)
        if job.error:
            raise RequestError(job.error[1], job.error[0])
        if job.n == 1:
            return media(*job.items[0])
        data, media_type = grid_bytes(job.samples)
        return media(data, media_type, job.items[0][2])

    @app.post("/api/jobs", status_code=202)
    def submit(req: GenerateRequest):
        job = studio.submit(req)
        return job.state(studio.position(job))

    @app.get("/api/jobs/{job_id}")
    def job_state(job_id: str):
        job = studio.job(job_id)
        return job.state(studio.position(job))

    @app.get("/api/jobs/{job_id}/items/{k}")
    def item(job_id: str, k: int):
        job = studio.job(job_id)
        if job.status != "done":
            raise RequestError(f"job {job_id} is {job.status}; its samples come when it is done", 409)
        if not 0 <= k < len(job.items):
            raise RequestError(f"job {job_id} has items 0..{len(job.items) - 1}", 404)
        return media(*job.items[k])

    return app
