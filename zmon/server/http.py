"""Serving layer: one asyncio thread parses HTTP/1.1 (h11) for every connection; handlers run on a small pool.

Why this shape (README "HTTP endpoints" has the measurements): a thread per connection (http.server) let 1,100
idle sockets take 1,024 threads and every file descriptor the samplers needed. Here a connection costs a few
KiB on one event loop, never a thread; at most `workers` threads run handlers; connections are capped
(`max_connections`, idle keep-alive ones are closed first to make room, then new ones get 503 + Retry-After);
every phase of a connection has a deadline (request read, keep-alive idle, response write, handler), and a
scrape that cannot be answered within its `X-Prometheus-Scrape-Timeout-Seconds` gets 503, not a late answer.
Malformed input is answered 4xx with a reason and the connection closed: never a 500, never a hang.
The exporter-toolkit web configuration (TLS, basic auth, headers, rate limit) is applied to every request.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import ipaddress
import json
import logging
import resource
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote_to_bytes

import h11

from zmon.server.core import MAX_BODY_BYTES, REASONS, Request, Response, encode
from zmon.server.webconfig import AuthVerdict, WebConfig, WebConfigWatcher

log = logging.getLogger(__name__)

# Methods this server knows; any other token gets 501 (RFC 9110 §9.1), a known one a route lacks gets 405.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})
SCRAPE_TIMEOUT_HEADER = "x-prometheus-scrape-timeout-seconds"
# Answer this much before the scraper's own deadline (blackbox_exporter's scrape_timeout_offset is 0.5 s), so
# a 503 arrives while Prometheus still listens; never less than half the scraper's timeout.
SCRAPE_TIMEOUT_OFFSET_SECONDS = 0.5
# A connection must have been idle this long before it is closed to make room for a new one: a client that
# has just connected has its request on the way.
EVICT_MIN_IDLE_SECONDS = 0.5
REJECT_LINGER_SECONDS = 1.0  # after a 503 at the connection cap: wait this long for the client to close first
FD_RESERVE = 128  # file descriptors kept out of serving's reach for samplers, logs and NVML


class Application(Protocol):
    def handle(self, req: Request) -> Response: ...

    def methods(self, path: str) -> frozenset[str] | None: ...


@dataclass(frozen=True)
class Limits:
    """Bounds of the serving layer (server.* in the config; README "HTTP endpoints")."""

    max_connections: int = 512
    workers: int = 4
    read_timeout: float = 10.0  # from a request's first byte (or the accept) to its last body byte
    idle_timeout: float = 90.0  # a keep-alive connection with no request in progress
    write_timeout: float = 10.0  # until a response has left zmon's buffers
    handler_timeout: float = 30.0  # a request without a scrape timeout header that no worker answered by then: 503
    backlog: int = 1024
    max_body_bytes: int = MAX_BODY_BYTES
    max_request_line: int = 8 * 1024
    max_header_bytes: int = 16 * 1024
    max_headers: int = 100

    @classmethod
    def from_config(cls, server: Any) -> Limits:
        """From a zmon.config.ServerConfig (duck-typed, so this module does not import the config)."""
        return cls(
            max_connections=server.max_connections,
            workers=server.workers,
            read_timeout=server.read_timeout_seconds,
            idle_timeout=server.idle_timeout_seconds,
            write_timeout=server.write_timeout_seconds,
        )


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (as Go's runtime does at start-up); returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.debug("RLIMIT_NOFILE soft limit raised from %d to %d", soft, target)
            soft = target
        except (OSError, ValueError) as e:
            log.warning("cannot raise RLIMIT_NOFILE from %d to %d: %s", soft, target, e)
    return soft, hard


def _bind(host: str, port: int, backlog: int) -> socket.socket:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, stype, proto, _, addr = infos[0]
    sock = socket.socket(family, stype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class _Stats:
    """Counters of the serving layer, for tests and logs (not exported: scrapes must not depend on them)."""

    def __init__(self) -> None:
        self.accepted = 0
        self.rejected = 0  # 503 at the connection cap
        self.evicted = 0  # idle keep-alive connections closed to make room
        self.timeouts = 0  # 408 / closed on a read, idle or write deadline
        self.late = 0  # 503 because the scrape timeout passed


class Server:
    """Serves an App over HTTP/1.1 (and TLS with a web config) on a background thread; bounded throughout.

    Binds in the constructor (an address in use raises OSError here), or serves `sock`, a listening socket
    handed over by the server it replaces (`listener()`: same address, new limits or web config, no moment
    without a listener); `start()` begins serving, `shutdown()` closes every connection and joins the threads.
    A bad `web_config_file` raises zmon.config.ConfigError.
    """

    def __init__(
        self,
        app: Application,
        host: str,
        port: int,
        *,
        limits: Limits | None = None,
        web_config_file: str | Path | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        self.app = app
        self.limits = limits or Limits()
        self.web = WebConfigWatcher(Path(web_config_file)) if web_config_file else None
        soft, _ = raise_nofile_limit()
        # Each connection can hold one fd, each 503 at the cap one more for a second; keep FD_RESERVE for the rest.
        cap = max(8, (soft - FD_RESERVE) // 2) if soft != resource.RLIM_INFINITY else self.limits.max_connections
        self.max_connections = min(self.limits.max_connections, cap)
        if self.max_connections < self.limits.max_connections:
            log.warning(
                "server.max_connections lowered from %d to %d: RLIMIT_NOFILE is %d",
                self.limits.max_connections,
                self.max_connections,
                soft,
            )
        self.max_rejecting = self.max_connections
        self._sock = sock if sock is not None else _bind(host, port, self.limits.backlog)
        self._address = self._sock.getsockname()  # kept: still known once the socket is closed
        self.stats = _Stats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(self.limits.workers, thread_name_prefix="zmon-http-worker")
        self._slots: asyncio.Semaphore | None = None
        self._conns: set[_Connection] = set()
        self._idle: collections.OrderedDict[_Connection, float] = collections.OrderedDict()  # oldest first
        self._rejecting = 0
        self._drain_seconds = 0.0

    # --- public surface -------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self._address[1])

    @property
    def host(self) -> str:
        return str(self._address[0])

    @property
    def tls(self) -> bool:
        return self.web is not None and self.web.current.ssl_context is not None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="zmon-http", daemon=True)
        self._thread.start()
        self._started.wait(10)

    def listener(self) -> socket.socket:
        """A duplicate of the listening socket, for the Server that replaces this one on the same address."""
        sock = self._sock.dup()
        sock.setblocking(False)
        return sock

    def shutdown(self, drain_seconds: float = 0.0) -> None:
        """Stop: close the listener, give requests in progress up to `drain_seconds` to finish (a reload
        replacing this server), then close every connection."""
        self._drain_seconds = drain_seconds
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop ended meanwhile
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout=5 + drain_seconds)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.web is not None:
            self.web.close()
        self._sock.close()

    # --- event loop -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except Exception:
            log.exception("HTTP server stopped")
        finally:
            loop.close()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._slots = asyncio.Semaphore(self.limits.workers)
        server = await loop.create_server(
            lambda: _Connection(self), sock=self._sock, backlog=self.limits.backlog, start_serving=True
        )
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            deadline = time.monotonic() + self._drain_seconds
            while time.monotonic() < deadline and any(c not in self._idle for c in self._conns):
                await asyncio.sleep(0.05)  # a request in progress finishes on the old server
            for conn in list(self._conns):
                conn.abort()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)

    # --- connection accounting (event loop thread only) -------------------------------------------------------

    def admit(self, conn: _Connection) -> bool:
        """A new connection: True to serve it; False when at the cap with no idle connection to close for it."""
        if len(self._conns) >= self.max_connections:
            now = time.monotonic()
            victim = next(iter(self._idle.items()), None)
            if victim is None or now - victim[1] < EVICT_MIN_IDLE_SECONDS:
                self.stats.rejected += 1
                return False
            self.stats.evicted += 1
            victim[0].close_idle()
        self._conns.add(conn)
        self.stats.accepted += 1
        return True

    def set_idle(self, conn: _Connection, idle: bool) -> None:
        if idle:
            self._idle[conn] = time.monotonic()
            self._idle.move_to_end(conn)
        else:
            self._idle.pop(conn, None)

    def forget(self, conn: _Connection) -> None:
        self._conns.discard(conn)
        self._idle.pop(conn, None)

    def web_config(self) -> WebConfig | None:
        return None if self.web is None else self.web.get()

    async def call(self, req: Request, deadline: float) -> Response | None:
        """Run the handler on a worker; None when no worker answered by `deadline` (monotonic)."""
        assert self._slots is not None
        loop = asyncio.get_running_loop()

        async def run() -> Response:
            assert self._slots is not None
            async with self._slots:  # waiting here, not in the pool's queue: a late request never runs at all
                return await loop.run_in_executor(self._pool, self.app.handle, req)

        try:
            return await asyncio.wait_for(run(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:  # (TimeoutError on 3.11+, asyncio.TimeoutError on 3.10)
            self.stats.late += 1
            return None


class _RequestError(Exception):
    """Bad request input: answer `status` with `reason` and close the connection."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers or {}


class _Connection(asyncio.Protocol):
    """One client connection: read a request within its deadline, run it, write the answer, repeat."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.limits = server.limits
        self.transport: asyncio.Transport | None = None
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        self.state = "new"  # new, handshake, idle, reading, busy, closing (answered, waiting to close), closed
        self.counted_reject = False  # holds one of the server's 503-at-the-cap slots
        self.eof = False  # the client half-closed
        self.is_tls = False
        self.early = bytearray()  # data the TLS layer passed up before start_tls returned
        self.timer: asyncio.TimerHandle | None = None
        self.head = bytearray()  # the start of the current request, to tell a long request line (414)
        self.request: h11.Request | None = None
        self.body = bytearray()
        self.write_paused = False
        self.drained: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.web: WebConfig | None = None

    # --- asyncio.Protocol -----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        srv = self.server
        try:
            self.web = srv.web_config()
        except Exception:  # never let a config problem kill the accept path
            log.exception("web config")
        if not srv.admit(self):
            self._reject()
            return
        ctx = self.web.ssl_context if self.web is not None else None
        if ctx is not None:
            self.state = "handshake"
            transport.pause_reading()  # nothing reaches HTTP parsing before the handshake
            self.task = asyncio.get_running_loop().create_task(self._handshake(ctx))
            return
        self._become_idle(self.limits.read_timeout)

    def data_received(self, data: bytes) -> None:
        if self.state == "handshake":
            if len(self.early) <= self.limits.max_header_bytes:
                self.early += data
            return
        if self.state in ("closing", "closed", "new"):
            return  # discarded: an answer is on its way and the connection will close
        if self.state == "idle":
            self.state = "reading"
            self.server.set_idle(self, False)
            self._set_timer(self.limits.read_timeout, self._read_timed_out)
        if self.state == "busy":
            self.transport.pause_reading()  # type: ignore[union-attr]
            self.h11.receive_data(data)  # a pipelined request: parsed once this one is answered
            return
        if self.request is None and len(self.head) <= self.limits.max_request_line:
            self.head += data[: self.limits.max_request_line + 1 - len(self.head)]
        self.h11.receive_data(data)
        self._advance()

    def eof_received(self) -> bool:
        self.eof = True
        if self.state in ("closing", "closed"):
            self.close()
            return False
        if self.state == "handshake":
            return False
        self.h11.receive_data(b"")
        if self.state != "busy":  # busy: the client half-closed after its request; answer, then close
            self._advance()
        return not self.is_tls  # keep our side open to write the answer (TLS cannot half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.counted_reject:
            self.counted_reject = False
            self.server._rejecting -= 1
        self.state = "closed"
        self._cancel_timer()
        self.server.forget(self)
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    # --- states ---------------------------------------------------------------------------------------------

    def _become_idle(self, timeout: float) -> None:
        self.state = "idle"
        self.head.clear()
        self.body.clear()
        self.request = None
        self.server.set_idle(self, True)
        self._set_timer(timeout, self._idle_timed_out)

    def _set_timer(self, seconds: float, callback: Callable[[], None]) -> None:
        self._cancel_timer()
        self.timer = asyncio.get_running_loop().call_later(seconds, callback)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _idle_timed_out(self) -> None:
        self.server.stats.timeouts += 1
        self.close()

    def _read_timed_out(self) -> None:
        self.server.stats.timeouts += 1
        got = len(self.body)
        want = self._content_length()
        detail = (
            f"body has {got} of {want} bytes"
            if want is not None
            else ("headers incomplete" if self.request is None else f"body has {got} bytes, no end of the chunked body")
        )
        self._fail(_RequestError(408, f"request incomplete after {self.limits.read_timeout:g}s: {detail}"))

    def close_idle(self) -> None:
        """Closed to make room for a new connection (at the connection cap)."""
        self.close()

    def close(self) -> None:
        if self.state != "closed" and self.transport is not None:
            self.state = "closed"
            self._cancel_timer()
            self.server.forget(self)
            self.transport.close()

    def abort(self) -> None:
        self.state = "closed"
        self._cancel_timer()
        if self.task is not None:
            self.task.cancel()
        if self.transport is not None:
            self.transport.abort()

    def _reject(self) -> None:
        """At the connection cap: 503 with Retry-After (plain HTTP), then close once the client has."""
        assert self.transport is not None
        srv = self.server
        if (self.web is not None and self.web.ssl_context is not None) or srv._rejecting >= srv.max_rejecting:
            # Over TLS a 503 needs a handshake (costly, and what the cap protects); beyond the 503 budget, close.
            self.state = "closed"
            self.transport.close()
            return
        srv._rejecting += 1
        self.counted_reject = True
        self.state = "closing"
        payload = (
            json.dumps({"error": f"too many connections (server.max_connections={srv.max_connections}); retry shortly"})
            + "\n"
        ).encode()
        head = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(payload))),
            ("Retry-After", "1"),
            ("Connection", "close"),
            *self._extra_headers(),
        ]
        self.transport.write(_raw_head(503, head) + payload)
        if self.transport.can_write_eof():
            self.transport.write_eof()  # FIN after the 503, so the client reads it before we close
        self.timer = asyncio.get_running_loop().call_later(REJECT_LINGER_SECONDS, self.transport.close)

    async def _handshake(self, ctx: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        assert self.transport is not None
        try:
            tls = await loop.start_tls(
                self.transport, self, ctx, server_side=True, ssl_handshake_timeout=self.limits.read_timeout
            )
        except (OSError, ssl.SSLError, ConnectionError, asyncio.TimeoutError) as e:
            log.debug("TLS handshake failed: %s", e)
            self.abort()
            self.server.forget(self)
            return
        if tls is None or self.state == "closed":
            return
        assert isinstance(tls, asyncio.Transport)
        self.transport = tls
        self.is_tls = True
        if self.web is not None and self.web.allowed_sans is not None:
            sans = _sans(tls.get_extra_info("peercert"))
            if not sans & self.web.allowed_sans:
                log.info("client certificate has none of client_allowed_sans (it has %s): closed", sorted(sans))
                self.close()
                return
        self._become_idle(self.limits.read_timeout)
        if self.early:
            early, self.early = bytes(self.early), bytearray()
            self.data_received(early)

    # --- parsing --------------------------------------------------------------------------------------------

    def _advance(self) -> None:
        """Feed h11's events through until it needs more data or a request is complete."""
        try:
            while self.state in ("reading", "idle"):
                if self.request is None and b"\n" not in self.head and len(self.head) > self.limits.max_request_line:
                    raise _RequestError(414, f"request line over {self.limits.max_request_line} bytes")
                ev = self.h11.next_event()
                if ev is h11.NEED_DATA or ev is h11.PAUSED:
                    return
                if isinstance(ev, h11.Request):
                    self._on_request(ev)
                elif isinstance(ev, h11.Data):
                    if len(self.body) + len(ev.data) > self.limits.max_body_bytes:
                        raise _RequestError(413, f"body over {self.limits.max_body_bytes} bytes")
                    self.body += ev.data
                elif isinstance(ev, h11.EndOfMessage):
                    self._start()
                    return
                elif isinstance(ev, h11.ConnectionClosed):
                    self.close()
                    return
        except h11.RemoteProtocolError as e:
            self._fail(self._protocol_error(e))
        except _RequestError as e:
            self._fail(e)

    def _protocol_error(self, e: h11.RemoteProtocolError) -> _RequestError:
        status = e.error_status_hint
        if (
            status == 431
            and self.request is None
            and len(self.head) > self.limits.max_request_line
            and b"\n" not in self.head
        ):
            return _RequestError(414, f"request line over {self.limits.max_request_line} bytes")
        if status == 431:
            return _RequestError(431, f"request headers over {self.limits.max_header_bytes} bytes")
        msg = str(e)
        if "peer unexpectedly closed" in msg or "incomplete" in msg.lower():
            msg = "connection closed before the request was complete"
        return _RequestError(status, f"malformed request: {msg}")

    def _on_request(self, ev: h11.Request) -> None:
        if self.state == "idle":  # bytes were buffered in h11 (pipelining) and we went idle in between
            self.state = "reading"
            self.server.set_idle(self, False)
            self._set_timer(self.limits.read_timeout, self._read_timed_out)
        self.request = ev
        # h11 bounds only a head that arrives in pieces; one that comes in a single read is measured here.
        if len(ev.method) + len(ev.target) + 10 > self.limits.max_request_line:
            raise _RequestError(414, f"request line over {self.limits.max_request_line} bytes")
        if len(ev.headers) > self.limits.max_headers:
            raise _RequestError(431, f"more than {self.limits.max_headers} request headers")
        if sum(len(k) + len(v) + 4 for k, v in ev.headers) > self.limits.max_header_bytes:
            raise _RequestError(431, f"request headers over {self.limits.max_header_bytes} bytes")
        try:
            method = ev.method.decode("ascii")
        except UnicodeDecodeError:
            raise _RequestError(400, "method is not ASCII") from None
        if method not in KNOWN_METHODS:
            raise _RequestError(501, f"method {method!r} not implemented; use GET, HEAD or POST")
        self._path(ev.target)  # 400 now for a target that is not UTF-8
        length = self._content_length()
        if length is not None and length > self.limits.max_body_bytes:
            raise _RequestError(413, f"body of {length} bytes over the limit of {self.limits.max_body_bytes}")
        if self.h11.client_is_waiting_for_100_continue:
            self._write(self.h11.send(h11.InformationalResponse(status_code=100, headers=[])))

    def _content_length(self) -> int | None:
        if self.request is None:
            return None
        for k, v in self.request.headers:
            if k == b"content-length":
                return int(v)  # h11 accepted it: digits only
        return None

    @staticmethod
    def _path(target: bytes) -> str:
        path = target.partition(b"?")[0]
        try:
            return unquote_to_bytes(path).decode("utf-8")
        except UnicodeDecodeError:
            raise _RequestError(400, "request target is not UTF-8 (after percent-decoding)") from None

    def _build_request(self, ev: h11.Request) -> Request:
        raw_path, _, raw_query = ev.target.partition(b"?")
        try:
            query = parse_qs(raw_query.decode("utf-8"), errors="strict") if raw_query else {}
            headers: dict[str, str] = {}
            for k, v in ev.headers:
                name, value = k.decode("ascii"), v.decode("utf-8")
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
        except UnicodeDecodeError:
            raise _RequestError(400, "request query or header is not UTF-8") from None
        return Request(ev.method.decode("ascii"), self._path(raw_path), query, headers, bytes(self.body))

    # --- answering ------------------------------------------------------------------------------------------

    def _start(self) -> None:
        assert self.request is not None and self.transport is not None
        self.state = "busy"
        self._cancel_timer()
        self.transport.pause_reading()  # one request at a time per connection: pipelined ones wait in h11
        self.task = asyncio.get_running_loop().create_task(self._respond(self.request, time.monotonic()))

    async def _respond(self, ev: h11.Request, received: float) -> None:
        try:
            await self._answer(ev, received)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not leave the connection hanging
            log.exception("answering a request failed")
            self._fail(_RequestError(500, "internal error (see zmon's log)"))

    async def _answer(self, ev: h11.Request, received: float) -> None:
        web = self.web = self.server.web_config() or self.web
        try:
            req = self._build_request(ev)
            deadline = received + self._budget(req)
            resp = await self._gate(req, web)
            if resp is None:
                resp = await self.server.call(req, deadline)
                if resp is None:
                    resp = Response(
                        503,
                        {
                            "error": "could not answer within the scrape timeout "
                            f"({deadline - received:.2f}s): zmon is overloaded"
                        },
                        {"Retry-After": "1"},
                    )
        except _RequestError as e:
            self._fail(e)
            return
        status, headers, payload = encode(resp)
        if ev.method == b"HEAD":
            payload = b""
        headers += self._extra_headers()
        try:
            self._write(
                self.h11.send(
                    h11.Response(status_code=status, headers=headers, reason=REASONS.get(status, "").encode())
                )
            )
            if payload:
                self._write(self.h11.send(h11.Data(data=payload)))
            self._write(self.h11.send(h11.EndOfMessage()))
        except (h11.LocalProtocolError, UnicodeError) as e:  # a handler set a header h11 refuses: 500, close
            log.error("response to %s %s refused by h11: %s", req.method, req.path, e)
            self._fail(_RequestError(500, "internal error: malformed response"))
            return
        if not await self._drain():
            return
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            self._become_idle(self.limits.idle_timeout)
            assert self.transport is not None
            self.transport.resume_reading()
            self._advance()  # a pipelined request already in h11's buffer
        else:
            self.close()

    def _budget(self, req: Request) -> float:
        raw = req.headers.get(SCRAPE_TIMEOUT_HEADER)
        if raw is None:
            return self.limits.handler_timeout
        try:
            t = float(raw)
        except ValueError:
            raise _RequestError(400, f"{SCRAPE_TIMEOUT_HEADER} must be a number of seconds, got {raw[:40]!r}") from None
        if not 0 < t < 1e6:
            raise _RequestError(400, f"{SCRAPE_TIMEOUT_HEADER} must be > 0, got {raw[:40]!r}")
        return min(max(t - SCRAPE_TIMEOUT_OFFSET_SECONDS, t / 2), self.limits.handler_timeout)

    async def _gate(self, req: Request, web: WebConfig | None) -> Response | None:
        """The web config's rate limit and basic auth; a Response refuses the request, None lets it through."""
        if web is None:
            return None
        if web.limiter is not None and not web.limiter.allow():
            return Response(429, {"error": "rate limited (rate_limit in the web config)"}, {"Retry-After": "1"})
        if not web.users or web.auth is None:
            return None
        verdict = await web.auth.check(req.headers.get("authorization"), web.users)
        if verdict is AuthVerdict.OK:
            return None
        if verdict is AuthVerdict.BUSY:
            return Response(503, {"error": "too many password checks in progress; retry shortly"}, {"Retry-After": "1"})
        return Response(
            401,
            {"error": "basic authentication required (basic_auth_users in the web config)"},
            {"WWW-Authenticate": 'Basic realm="zmon"'},
        )

    def _extra_headers(self) -> list[tuple[str, str]]:
        return list(self.web.headers) if self.web is not None else []

    def _write(self, data: bytes) -> None:
        if self.transport is not None and self.state != "closed":
            self.transport.write(data)

    async def _drain(self) -> bool:
        """Wait until the response has left our buffer (write_timeout); False if the connection was dropped."""
        if self.state == "closed":
            return False
        if self.write_paused:
            self.drained = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self.drained, self.limits.write_timeout)
            except asyncio.TimeoutError:
                self.server.stats.timeouts += 1
                log.debug("client did not read its response within %gs: closed", self.limits.write_timeout)
                self.abort()
                return False
            finally:
                self.drained = None
        return self.state != "closed"

    def _fail(self, e: _RequestError) -> None:
        """Answer a request error and close: the rest of the stream cannot be trusted."""
        if self.state == "closed" or self.transport is None:
            return
        self._cancel_timer()
        self.server.set_idle(self, False)
        payload = (json.dumps({"error": e.reason}) + "\n").encode()
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(payload))),
            ("Connection", "close"),
            *e.headers.items(),
            *self._extra_headers(),
        ]
        self.state = "closing"
        self.transport.write(_raw_head(e.status, headers) + payload)
        if self.eof:
            self.close()
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()
        # Keep reading (and discarding) until the client closes or the linger ends: closing with unread input
        # would send a RST that can destroy the answer before the client reads it.
        self.transport.resume_reading()
        self.timer = asyncio.get_running_loop().call_later(REJECT_LINGER_SECONDS, self.close)


def _raw_head(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, '')}"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _sans(cert: Any) -> set[str]:
    """Subject alternative names of a verified peer certificate (ssl.getpeercert() form), normalised."""
    out: set[str] = set()
    for kind, value in (cert or {}).get("subjectAltName", ()):
        if kind == "IP Address":
            with contextlib.suppress(ValueError):
                value = str(ipaddress.ip_address(value.strip()))
        out.add(value)
    return out
