"""Fuzzing the HTTP input (hypothesis): raw request bytes to a live server socket never get a 500, never hang,
and the server keeps answering."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from zmon.server import App, HTTPError, Limits, Request, Response, Server

READ_TIMEOUT = 0.5
# Every answer within the read timeout plus scheduling slack; the REJECT linger (1 s) bounds the close.
ANSWER_WITHIN = READ_TIMEOUT + 2.5


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    app = App(CollectorRegistry(auto_describe=False), lambda: True, lambda: "tok")

    def act(req: Request) -> Response:
        body = req.json()
        if not isinstance(body, dict):
            raise HTTPError(400, "expected a JSON object")
        return Response(202, {"keys": sorted(map(str, body))})

    app.add_route("/actions", act, methods=("POST",), auth=True)
    srv = Server(
        app, "127.0.0.1", 0, limits=Limits(read_timeout=READ_TIMEOUT, idle_timeout=READ_TIMEOUT, max_connections=64)
    )
    srv.start()
    yield srv.port
    srv.shutdown()


def exchange(port: int, data: bytes) -> tuple[bytes, float]:
    """Send `data`, half-close, read until the server closes; (response bytes, seconds)."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_WITHIN) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may answer and close before it read everything
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except ConnectionResetError:
            pass
    return out, time.monotonic() - t0


def check(port: int, data: bytes) -> None:
    out, took = exchange(port, data)  # a hang raises TimeoutError from recv
    statuses = [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", out)]
    assert 500 not in statuses, out[:500]
    assert all(s < 500 or s in (501, 503, 505) for s in statuses), out[:500]
    assert took < ANSWER_WITHIN


methods = st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"BREW", b"get", b"", b"G\x00T"])
paths = st.sampled_from(
    [
        b"/metrics",
        b"/healthz",
        b"/readyz",
        b"/actions",
        b"/",
        b"*",
        b"/%ff",
        b"/a?b=%zz",
        b"http://x/metrics",
        b"/metrics?name[]=x",
    ]
)
header_names = st.sampled_from(
    [
        b"Host",
        b"Content-Length",
        b"Transfer-Encoding",
        b"Authorization",
        b"X-Zmon-Token",
        b"Accept",
        b"Accept-Encoding",
        b"Connection",
        b"Expect",
        b"X-Prometheus-Scrape-Timeout-Seconds",
        b"X-\xff",
        b"Bad Name",
        b"",
    ]
)
header_values = st.one_of(
    st.sampled_from(
        [
            b"-1",
            b"0",
            b"5",
            b"99999999999999999999",
            b"chunked",
            b"gzip, chunked",
            b"close",
            b"100-continue",
            b"Bearer tok",
            b"Basic !!",
            b"application/openmetrics-text",
            b"gzip",
            b"0.001",
            b"nan",
            b"\xff\xfe",
        ]
    ),
    st.binary(max_size=40),
)
bodies = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b"{}", b'{"a": 1}', b"[" * 5000 + b"]" * 5000, b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\n"]),
)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    line = draw(methods) + b" " + draw(paths) + b" " + draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/9", b""]))
    headers = draw(st.lists(st.tuples(header_names, header_values), max_size=6))
    sep = draw(st.sampled_from([b"\r\n", b"\n", b"\r"]))
    raw = line + sep + b"".join(k + b": " + v + sep for k, v in headers) + sep + draw(bodies)
    return raw


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=requests())
def test_structured_requests_never_500_never_hang(port: int, data: bytes) -> None:
    check(port, data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=2000))
def test_random_bytes_never_500_never_hang(port: int, data: bytes) -> None:
    check(port, data)


def test_server_still_answers_after_the_fuzzing(port: int) -> None:
    out, _ = exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 ")
