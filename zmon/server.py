"""HTTP: /metrics (text or OpenMetrics by Accept), /healthz, /readyz, and authenticated control endpoints."""

from __future__ import annotations

import gzip
import hmac
import json
import logging
import threading
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, choose_encoder, gzip_accepted

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
        except ValueError as e:
            raise HTTPError(400, f"body is not valid JSON: {e}") from None


@dataclass
class Response:
    status: int = 200
    body: Any = None  # dict/list → JSON, str → text/plain
    headers: dict[str, str] = field(default_factory=dict)


class HTTPError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


Handler = Callable[[Request], Response]

_REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}


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
    """WSGI application. Control routes need `Authorization: Bearer <token>`; with no token configured
    they answer 403 (off unless configured), a wrong or missing token gets 401.

    With `cache` (a RenderCache over zmon's collectors) /metrics is served from it; without, through
    prometheus_client's own WSGI app over `registry`.
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
        self._metrics = make_wsgi_app(registry) if cache is None else self._cached_metrics
        self._ready = ready
        self._token = token
        self._routes: dict[str, Route] = {}
        self.add_route("/healthz", lambda r: Response(200, "ok\n"), methods=("GET", "HEAD"))
        self.add_route("/readyz", self._readyz, methods=("GET", "HEAD"))

    def add_route(self, path: str, handler: Handler, *, methods: Iterable[str] = ("GET",), auth: bool = False) -> None:
        if path in self._routes or path == "/metrics":
            raise ValueError(f"route {path} registered twice")
        self._routes[path] = Route(frozenset(methods), handler, auth)

    def _cached_metrics(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD")])
            return [f"# HTTP 405: {method}; use GET\n".encode()]
        params = parse_qs(environ.get("QUERY_STRING", ""))
        if "name[]" in params:  # a filtered scrape: prometheus_client's own path, uncached
            return make_wsgi_app(self._registry)(environ, start_response)  # type: ignore[no-any-return,unused-ignore]
        assert self._cache is not None
        encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
        output = self._cache.render(encoder, content_type)
        headers = [("Content-Type", content_type)]
        if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")):
            output = gzip.compress(output)
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [b"" if method == "HEAD" else output]

    def _readyz(self, _: Request) -> Response:
        if self._ready():
            return Response(200, "ready\n")
        return Response(503, "not ready: waiting for the first sample of every enabled source\n")

    def _check_auth(self, headers: dict[str, str]) -> None:
        expected = self._token()
        if not expected:
            raise HTTPError(403, "control endpoints are disabled: configure server.auth (token_file or token_env)")
        got = headers.get("authorization", "")
        scheme, _, cred = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(cred.strip().encode(), expected.encode()):
            raise HTTPError(401, "missing or wrong bearer token")

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return self._metrics(environ, start_response)  # type: ignore[no-any-return,unused-ignore]
        try:
            resp = self._dispatch(environ, path)
        except HTTPError as e:
            resp = Response(e.status, {"error": e.reason})
        except Exception as e:  # a handler bug is a 500 with a reason, never a dead server
            log.exception("handler for %s failed", path)
            resp = Response(500, {"error": f"{type(e).__name__}: {e}"})
        if isinstance(resp.body, (dict, list)):
            payload = (json.dumps(resp.body, indent=1) + "\n").encode()
            ctype = "application/json"
        else:
            payload = str(resp.body or "").encode()
            ctype = "text/plain; charset=utf-8"
        headers = [("Content-Type", ctype), ("Content-Length", str(len(payload)))]
        headers += list(resp.headers.items())
        if resp.status == 401:
            headers.append(("WWW-Authenticate", 'Bearer realm="zmon"'))
        start_response(f"{resp.status} {_REASONS.get(resp.status, '')}", headers)
        return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else payload]

    def _dispatch(self, environ: dict[str, Any], path: str) -> Response:
        route = self._routes.get(path)
        if route is None:
            raise HTTPError(404, f"no such endpoint: {path}")
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in route.methods:
            raise HTTPError(405, f"{method} not allowed on {path}; use {', '.join(sorted(route.methods))}")
        headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}
        if route.auth:
            self._check_auth(headers)
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            raise HTTPError(400, "bad Content-Length") from None
        if length > MAX_BODY_BYTES:
            raise HTTPError(413, f"body over {MAX_BODY_BYTES} bytes")
        body = environ["wsgi.input"].read(length) if length else b""
        req = Request(method, path, parse_qs(environ.get("QUERY_STRING", "")), headers, body)
        return route.handler(req)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)


class Server:
    """Serves an App on a background thread (threaded, so a slow client never blocks a scrape)."""

    def __init__(self, app: App, host: str, port: int) -> None:
        self.app = app
        self._httpd = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="zmon-http", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
