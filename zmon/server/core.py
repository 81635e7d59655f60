"""The HTTP application: routes, /metrics (text or OpenMetrics by Accept, gzip), health, authenticated control.

Independent of the transport: `App.handle(Request) -> Response` is called by zmon.server.http on a bounded
worker pool; `App` is also a WSGI application for embedding.
"""

from __future__ import annotations

import gzip
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON ({} when empty); raises HTTPError(400) with the reason when it is not JSON."""
        if not self.body:
            return {}
        try:
            return json.loads(self.body)
        except RecursionError:  # json's C scanner recurses per nesting level: 30,000 '[' exhausts the stack
            raise HTTPError(400, "body is not acceptable JSON: nested too deeply") from None
        except ValueError as e:  # includes UnicodeDecodeError: the body is not UTF-8/16/32
            raise HTTPError(400, f"body is not valid JSON: {e}") from None


@dataclass
class Response:
    status: int = 200
    body: Any = None  # dict/list → JSON, str → text/plain, bytes → as is (set Content-Type in headers)
    headers: dict[str, str] = field(default_factory=dict)


class HTTPError(Exception):
    """A 4xx/5xx with a reason, answered as JSON {"error": reason}; `headers` go on the response."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


Handler = Callable[[Request], Response]

REASONS = {
    200: "OK",
    202: "Accepted",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    411: "Length Required",
    413: "Content Too Large",
    414: "URI Too Long",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
TOKEN_HEADER = "x-zmon-token"  # the control token when Authorization carries basic auth (web config)


@dataclass(frozen=True)
class Route:
    methods: frozenset[str]
    handler: Handler
    auth: bool


class RenderCache:
    """/metrics text rendered per collector, kept until one of the snapshots the collector reads changes.

    Formatting is most of a scrape's cost (prometheus_client spends ~4 µs a sample). Collectors that declare
    their sources are re-rendered on the sampler thread right after a new sample (`warm`), in each format a
    scraper has asked for, so a scrape only concatenates bytes and renders the few self-metrics. The bytes are
    exactly what prometheus_client's encoder produces for the whole registry (OpenMetrics' `# EOF` once).
    """

    EOF = b"# EOF\n"

    def __init__(self, collectors: Callable[[], Sequence[Any]]) -> None:
        self._collectors = collectors
        self._lock = threading.Lock()
        self._texts: dict[tuple[str, str], tuple[Hashable, bytes]] = {}
        self._encoders: dict[str, Callable[[Any], bytes]] = {}  # formats scrapers asked for

    def _text(self, c: Any, encoder: Callable[[Any], bytes], content_type: str) -> bytes:
        key = c.cache_key() if c.cache_key is not None else None
        slot = (c.name, content_type)
        with self._lock:
            hit = self._texts.get(slot)
        if key is not None and hit is not None and hit[0] == key:
            return hit[1]
        text = encoder(_Single(c))
        if content_type.startswith("application/openmetrics-text") and text.endswith(self.EOF):
            text = text[: -len(self.EOF)]
        if key is not None and not c.failed_last:
            with self._lock:
                self._texts[slot] = (key, text)
        return text

    def render(self, encoder: Callable[[Any], bytes], content_type: str) -> bytes:
        with self._lock:
            self._encoders.setdefault(content_type, encoder)
        body = b"".join(self._text(c, encoder, content_type) for c in self._collectors())
        return body + (self.EOF if content_type.startswith("application/openmetrics-text") else b"")

    def forget(self, name: str) -> None:
        """Drop the texts of a collector that was removed (a reload), so a new one of that name starts fresh."""
        with self._lock:
            for slot in [k for k in self._texts if k[0] == name]:
                del self._texts[slot]

    def warm(self, source: str) -> None:
        """After a new sample of `source`: re-render the collectors that read it (a sampler listener)."""
        with self._lock:
            encoders = list(self._encoders.items())
        for c in self._collectors():
            if source in c.sources:
                for content_type, encoder in encoders:
                    self._text(c, encoder, content_type)


class _Single:
    def __init__(self, collector: Any) -> None:
        self.collector = collector

    def collect(self) -> Iterable[Any]:
        return self.collector.collect()


class App:
    """Routes and /metrics. Control routes need the token from server.auth, as `Authorization: Bearer <token>`
    or `X-Zmon-Token: <token>` (the latter when basic auth from the web config takes Authorization); with no
    token configured they answer 403 (off unless configured), a wrong or missing token gets 401, a token file
    that cannot be read at run time 503 (the path goes to the log, not to the client).

    With `cache` (a RenderCache over zmon's collectors) /metrics is served from it; without, through
    prometheus_client's encoder over `registry`. Thread-safe: `handle` runs on several worker threads.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        ready: Callable[[], bool],
        token: Callable[[], str | None] = lambda: None,
        cache: RenderCache | None = None,
    ) -> None:
        self._registry = registry
        self._cache = cache
        self._ready = ready
        self._token = token
        self._token_logged = 0.0  # monotonic time of the last "token unreadable" log line (one a minute)
        self._routes: dict[str, Route] = {}
        self._provisional: set[str] = set()
        self.add_route("/healthz", lambda r: Response(200, "ok\n"), methods=("GET", "HEAD"))
        self.add_route("/readyz", self._readyz, methods=("GET", "HEAD"))

    def add_route(
        self,
        path: str,
        handler: Handler,
        *,
        methods: Iterable[str] = ("GET",),
        auth: bool = False,
        provisional: bool = False,
    ) -> None:
        """Serve `path` with `handler`. A `provisional` route (e.g. "still loading" while `zmon run` loads the
        model) is replaced by the next add_route of the same path; any other path may be added once."""
        if (path in self._routes and path not in self._provisional) or path == "/metrics":
            raise ValueError(f"route {path} registered twice")
        self._routes[path] = Route(frozenset(methods), handler, auth)
        if provisional:
            self._provisional.add(path)
        else:
            self._provisional.discard(path)

    def methods(self, path: str) -> frozenset[str] | None:
        """The methods `path` answers, None for an unknown path (lets the server refuse a body early)."""
        if path == "/metrics":
            return frozenset(("GET", "HEAD"))
        route = self._routes.get(path)
        return None if route is None else route.methods

    def handle(self, req: Request) -> Response:
        """Answer one request; never raises (a handler bug is a 500 with a reason, never a dead server)."""
        try:
            if req.path == "/metrics":
                return self._metrics(req)
            return self._dispatch(req)
        except HTTPError as e:
            return Response(e.status, {"error": e.reason}, dict(e.headers))
        except Exception as e:
            log.exception("handler for %s failed", req.path)
            return Response(500, {"error": f"{type(e).__name__}: {e}"})

    def _metrics(self, req: Request) -> Response:
        if req.method not in ("GET", "HEAD"):
            raise HTTPError(405, f"{req.method} not allowed on /metrics; use GET", {"Allow": "GET, HEAD"})
        encoder, content_type = choose_encoder(req.headers.get("accept", ""))
        names = req.query.get("name[]")
        if self._cache is not None and names is None:
            output = self._cache.render(encoder, content_type)
        else:  # a filtered scrape, or no cache: prometheus_client's own path, uncached
            output = encoder(self._registry.restricted_registry(names) if names else self._registry)
        headers = {"Content-Type": content_type}
        if gzip_accepted(req.headers.get("accept-encoding", "")):
            output = gzip.compress(output)
            headers["Content-Encoding"] = "gzip"
        return Response(200, output, headers)

    def _readyz(self, _: Request) -> Response:
        if self._ready():
            return Response(200, "ready\n")
        return Response(503, "not ready: waiting for the first sample of every enabled source\n")

    def _check_auth(self, headers: dict[str, str]) -> None:
        try:
            expected = self._token()
        except (OSError, ValueError) as e:  # token file deleted, unreadable or not text since start-up
            now = time.monotonic()
            if now - self._token_logged > 60:
                self._token_logged = now
                log.error("control endpoints: cannot read the token (server.auth): %s", e)
            raise HTTPError(
                503,
                "control endpoints unavailable: the configured token cannot be read (see zmon's log)",
                {"Retry-After": "30"},
            ) from None
        if not expected:
            raise HTTPError(403, "control endpoints are disabled: configure server.auth (token_file or token_env)")
        got = headers.get(TOKEN_HEADER)
        if got is None:
            scheme, _, cred = headers.get("authorization", "").partition(" ")
            got = cred if scheme.lower() == "bearer" else ""
        if not hmac.compare_digest(got.strip().encode(), expected.encode()):
            raise HTTPError(
                401,
                "missing or wrong control token: send Authorization: Bearer <token>, "
                "or X-Zmon-Token: <token> when basic auth is on",
                {"WWW-Authenticate": 'Bearer realm="zmon"'},
            )

    def _dispatch(self, req: Request) -> Response:
        route = self._routes.get(req.path)
        if route is None:
            raise HTTPError(404, f"no such endpoint: {req.path}")
        if req.method not in route.methods:
            allow = ", ".join(sorted(route.methods))
            raise HTTPError(405, f"{req.method} not allowed on {req.path}; use {allow}", {"Allow": allow})
        if route.auth:
            self._check_auth(req.headers)
        return route.handler(req)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """WSGI entry (for embedding in another server; zmon's own server calls `handle`)."""
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            resp = Response(
                400 if length < 0 else 413,
                {"error": "bad Content-Length" if length < 0 else f"body over {MAX_BODY_BYTES} bytes"},
            )
        else:
            req = Request(
                environ.get("REQUEST_METHOD", "GET"),
                environ.get("PATH_INFO", "/"),
                parse_qs(environ.get("QUERY_STRING", "")),
                {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")},
                environ["wsgi.input"].read(length) if length else b"",
            )
            resp = self.handle(req)
        status, headers, payload = encode(resp)
        start_response(f"{status} {REASONS.get(status, '')}", headers)
        return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else payload]


def encode(resp: Response) -> tuple[int, list[tuple[str, str]], bytes]:
    """(status, headers, payload) of a Response: JSON for dict/list, text for str, bytes as they are."""
    headers = dict(resp.headers)
    if isinstance(resp.body, (bytes, bytearray, memoryview)):
        payload = bytes(resp.body)
        headers.setdefault("Content-Type", "application/octet-stream")
    elif isinstance(resp.body, (dict, list)):
        payload = (json.dumps(resp.body, indent=1) + "\n").encode()
        headers.setdefault("Content-Type", "application/json")
    else:
        payload = str(resp.body or "").encode()
        headers.setdefault("Content-Type", "text/plain; charset=utf-8")
    headers["Content-Length"] = str(len(payload))
    return resp.status, list(headers.items()), payload
