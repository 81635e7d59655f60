"""Serving layer: keep-alive, HEAD, gzip, connection cap (evict idle, then 503), timeouts, scrape timeout, bad input."""

from __future__ import annotations

import gzip
import http.client
import json
import resource
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import generate_latest

from zmon.server import App, HTTPError, Limits, Request, Response, Server

READ_TIMEOUT = 1.0


class One:
    def collect(self):  # type: ignore[no-untyped-def]
        g = GaugeMetricFamily("zmon_test_value", "A test value.")
        g.add_metric([], 1.5)
        yield g


class Served:
    def __init__(self, srv: Server, token_file: Path) -> None:
        self.srv = srv
        self.port = srv.port
        self.token_file = token_file
        self.release = threading.Event()

    def raw(self, data: bytes, *, timeout: float = 5.0, half_close: bool = False) -> bytes:
        """Send raw bytes; everything the server sends until it closes (or `timeout`)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
            out = b""
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    break
                if not chunk:
                    break
                out += chunk
            return out

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)


def status(resp: bytes) -> int:
    assert resp.startswith(b"HTTP/1.1 "), resp[:100]
    return int(resp[9:12])


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(One())  # type: ignore[arg-type]
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    from zmon.config import AuthConfig

    app = App(reg, lambda: True, AuthConfig(token_file=token_file).token)
    box: dict[str, Served] = {}

    def act(req: Request) -> Response:
        body = req.json()
        if not isinstance(body, dict):
            raise HTTPError(400, "expected a JSON object")
        return Response(202, {"accepted": body})

    def slow(req: Request) -> Response:
        box["s"].release.wait(5)
        return Response(200, "late\n")

    app.add_route("/act", act, methods=("POST",), auth=True)
    app.add_route("/slow", slow, methods=("GET",))
    srv = Server(
        app,
        "127.0.0.1",
        0,
        limits=Limits(max_connections=8, workers=2, read_timeout=READ_TIMEOUT, idle_timeout=2.0, write_timeout=2.0),
    )
    srv.start()
    box["s"] = Served(srv, token_file)
    try:
        yield box["s"]
    finally:
        box["s"].release.set()
        srv.shutdown()


def test_keep_alive_head_and_gzip_bodies_match_prometheus_client(served: Served) -> None:
    reg_text = None
    c = served.conn()
    c.request("GET", "/metrics")
    r = c.getresponse()
    plain = r.read()
    assert r.status == 200 and b"zmon_test_value 1.5" in plain
    c.request("HEAD", "/metrics")  # same connection: keep-alive
    r = c.getresponse()
    assert r.status == 200 and r.read() == b"" and int(r.headers["Content-Length"]) == len(plain)
    c.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
    r = c.getresponse()
    assert r.headers["Content-Encoding"] == "gzip" and gzip.decompress(r.read()) == plain
    c.close()
    reg = CollectorRegistry(auto_describe=False)
    reg.register(One())  # type: ignore[arg-type]
    reg_text = generate_latest(reg)
    assert plain == reg_text  # byte-identical to prometheus_client's exposition


def test_raises_soft_nofile_to_hard(served: Served) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == hard or hard == resource.RLIM_INFINITY


def test_idle_connections_are_closed_to_make_room_for_a_scrape(served: Served) -> None:
    idle = [socket.create_connection(("127.0.0.1", served.port)) for _ in range(8)]
    try:
        time.sleep(0.7)  # older than EVICT_MIN_IDLE_SECONDS
        c = served.conn()
        c.request("GET", "/metrics")
        assert c.getresponse().status == 200
        c.close()
        assert served.srv.stats.evicted >= 1
    finally:
        for s in idle:
            s.close()


def test_at_the_cap_with_no_idle_connection_a_new_one_gets_503(served: Served) -> None:
    busy = []
    for _ in range(8):  # each mid-request: not idle, not evictable
        s = socket.create_connection(("127.0.0.1", served.port))
        s.sendall(b"GET /metrics HTTP/1.1\r\n")
        busy.append(s)
    try:
        time.sleep(0.2)
        resp = served.raw(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status(resp) == 503 and b"Retry-After: 1" in resp and b"max_connections" in resp
    finally:
        for s in busy:
            s.close()
    time.sleep(0.1)
    c = served.conn()
    c.request("GET", "/healthz")
    assert c.getresponse().status == 200


def test_slow_request_gets_408_and_idle_keepalive_is_closed(served: Served) -> None:
    t0 = time.monotonic()
    resp = served.raw(b"POST /act HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{", timeout=5)
    took = time.monotonic() - t0
    assert status(resp) == 408 and b"1 of 100 bytes" in resp
    assert READ_TIMEOUT <= took < READ_TIMEOUT + 1.5
    # a trickle does not extend the deadline
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as s:
        t0 = time.monotonic()
        got = b""
        for b in b"GET /metrics HTTP/1.1\r\nX-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n":
            try:
                s.sendall(bytes([b]))
            except OSError:
                break
            s.settimeout(0.1)
            try:
                got += s.recv(1024)
            except TimeoutError:
                continue
            break
        assert status(got) == 408 and time.monotonic() - t0 < READ_TIMEOUT + 1.0
    # an idle keep-alive connection is closed after idle_timeout (2 s)
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        t0 = time.monotonic()
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        assert status(data) == 200 and 1.5 < time.monotonic() - t0 < 4


def test_scrape_timeout_header_gets_503_instead_of_a_late_answer(served: Served) -> None:
    t0 = time.monotonic()
    resp = served.raw(
        b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Prometheus-Scrape-Timeout-Seconds: 0.6\r\nConnection: close\r\n\r\n"
    )
    took = time.monotonic() - t0
    assert status(resp) == 503 and b"scrape timeout" in resp and took < 0.6
    served.release.set()
    assert (
        status(served.raw(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Prometheus-Scrape-Timeout-Seconds: abc\r\n\r\n"))
        == 400
    )


def test_body_and_header_errors_are_4xx_with_a_reason(served: Served) -> None:
    auth = b"Authorization: Bearer s3cret\r\n"
    cases: list[tuple[bytes, int, bytes]] = [
        (b"POST /act HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400, b"Content-Length"),
        (b"POST /act HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n", 400, b"Content-Length"),
        (b"POST /act HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n", 413, b"over the limit"),
        (b"POST /act HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, b"malformed"),
        (b"POST /act HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501, b"chunked"),
        (
            b"POST /act HTTP/1.1\r\nHost: x\r\n"
            + auth
            + b"Content-Length: 60000\r\n\r\n"
            + b"[" * 30000
            + b"]" * 30000,
            400,
            b"nested too deeply",
        ),
        (b"POST /act HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 4\r\n\r\n\xff\xfe\xfd\xfc", 400, b"JSON"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, b"request line"),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-A: " + b"b" * 20000 + b"\r\n\r\n", 431, b"headers over"),
        (
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(150)) + b"\r\n",
            431,
            b"more than 100",
        ),
        (b"BREW /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 501, b"not implemented"),
        (b"DELETE /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405, b"not allowed"),
        (b"GET /metr%ffics HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"UTF-8"),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-A: \xff\xfe\r\nConnection: close\r\n\r\n", 400, b"UTF-8"),
        (b"GET /metrics?a=%ff HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"UTF-8"),
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", 400, b"malformed"),
    ]
    for raw, want, reason in cases:
        resp = served.raw(raw, half_close=False, timeout=READ_TIMEOUT + 3)
        assert status(resp) == want, (raw[:60], resp[:300])
        assert reason in resp, (raw[:60], resp[:300])
    # a request cut short by the client's close: 400 at once (no wait for the read timeout)
    t0 = time.monotonic()
    resp = served.raw(b"POST /act HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab", half_close=True)
    assert status(resp) == 400 and time.monotonic() - t0 < READ_TIMEOUT
    # the server still answers
    assert status(served.raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")) == 200


def test_chunked_body_and_100_continue_are_supported(served: Served) -> None:
    body = json.dumps({"n": 1}).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    resp = served.raw(
        b"POST /act HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\nConnection: close\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunked
    )
    assert status(resp) == 202 and b'"n": 1' in resp
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as s:
        s.sendall(
            b"POST /act HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\nConnection: close\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        assert s.recv(100).startswith(b"HTTP/1.1 100 ")
        s.sendall(body)
        assert status(s.recv(4096)) == 202
    # a chunked body over the limit: 413 as it arrives
    big = b"10000\r\n" + b"x" * 0x10000 + b"\r\n" + b"10\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n"
    resp = served.raw(b"POST /act HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + big)
    assert status(resp) == 413


def test_token_file_removed_at_run_time_is_503_without_the_path(served: Served) -> None:
    served.token_file.unlink()
    resp = served.raw(
        b"POST /act HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\nContent-Length: 2\r\n"
        b"Connection: close\r\n\r\n{}"
    )
    assert status(resp) == 503 and b"cannot be read" in resp
    assert str(served.token_file).encode() not in resp and b"token" in resp
    served.token_file.write_text("s3cret")
    resp = served.raw(
        b"POST /act HTTP/1.1\r\nHost: x\r\nX-Zmon-Token: s3cret\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    )
    assert status(resp) == 202


def test_pipelined_requests_are_answered_in_order(served: Served) -> None:
    resp = served.raw(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert resp.count(b"HTTP/1.1 200 OK") == 2 and resp.index(b"ok\n") < resp.index(b"ready\n")


def test_config_bounds_and_example() -> None:
    from zmon.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(
            environ={},
            overrides={
                "server": {
                    "max_connections": 1,
                    "workers": 0,
                    "read_timeout_seconds": 0,
                    "idle_timeout_seconds": 1e9,
                    "write_timeout_seconds": -1,
                }
            },
        )
    text = str(e.value)
    for key in ("max_connections", "workers", "read_timeout_seconds", "idle_timeout_seconds", "write_timeout_seconds"):
        assert f"server.{key}" in text
    cfg = load_config(environ={})
    lim = Limits.from_config(cfg.server)
    assert lim.max_connections == 512 and lim.backlog >= 1024
