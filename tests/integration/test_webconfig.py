"""exporter-toolkit web configuration: validation (every error at once), TLS with real certificates, client
certificates, min_version, cipher suites, basic auth (bcrypt, cached), headers, rate limit, reload."""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest
from prometheus_client import CollectorRegistry

from tests.tlsfiles import Pki, make_pki
from zmon.config import ConfigError
from zmon.server import App, Limits, Request, Response, Server, load_web_config
from zmon.server.webconfig import BasicAuth, parse_go_duration

PASSWORD = "correct horse"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$", 1)  # htpasswd's prefix


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def write(tmp: Path, text: str) -> Path:
    p = tmp / "web.yml"
    p.write_text(text)
    return p


def base_config(pki: Pki, extra: str = "", tls_extra: str = "") -> str:
    return (
        f"tls_server_config:\n  cert_file: {pki.server_cert}\n  key_file: {pki.server_key}\n{tls_extra}"
        f"basic_auth_users:\n  prometheus: '{HASH}'\n"
        "http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n"
        "    Strict-Transport-Security: max-age=31536000\n" + extra
    )


def make_app(token: str | None = "tok") -> App:
    app = App(CollectorRegistry(auto_describe=False), lambda: True, lambda: token)
    app.add_route("/act", lambda r: Response(202, {"ok": True}), methods=("POST",), auth=True)
    return app


@pytest.fixture
def serve() -> Iterator:  # type: ignore[type-arg]
    servers: list[Server] = []

    def start(path: Path, app: App | None = None) -> Server:
        srv = Server(
            app or make_app(), "127.0.0.1", 0, web_config_file=path, limits=Limits(read_timeout=2.0, max_connections=64)
        )
        srv.start()
        servers.append(srv)
        return srv

    yield start
    for s in servers:
        s.shutdown()


def client_ctx(
    pki: Pki, *, cert: tuple[Path, Path] | None = None, max_version: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert:
        ctx.load_cert_chain(*cert)
    if max_version:
        ctx.maximum_version = max_version
    return ctx


def get(
    srv: Server,
    ctx: ssl.SSLContext,
    path: str = "/metrics",
    headers: dict[str, str] | None = None,
    method: str = "GET",
    body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    c = http.client.HTTPSConnection("127.0.0.1", srv.port, context=ctx, timeout=5)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, dict(r.headers), r.read()
    finally:
        c.close()


def basic(user: str = "prometheus", password: str = PASSWORD) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# ------------------------------------------------------------------------------------------------ validation


def test_every_problem_is_listed(tmp_path: Path, pki: Pki) -> None:
    p = write(
        tmp_path,
        f"""
tls_server_config:
  cert_file: {pki.server_cert}
  key_file: {tmp_path}/absent.key
  client_auth_type: Sometimes
  min_version: TLS14
  cipher_suites: [TLS_RSA_WITH_RC4_128_SHA]
  curve_preferences: [CurveP256, CurveP384]
http_server_config:
  headers:
    X-Frame-Options: allow
    Server: zmon
basic_auth_users:
  alice: plaintext
rate_limit:
  interval: soon
nope: 1
""",
    )
    with pytest.raises(ConfigError) as e:
        load_web_config(p)
    text = str(e.value)
    for want in (
        "client_auth_type",
        "TLS14",
        "unknown cipher",
        "only one curve",
        "X-Frame-Options",
        "'Server' can not be configured",
        "alice",
        "not a bcrypt hash",
        "rate_limit.interval",
        "nope: unknown key",
    ):
        assert want in text, (want, text)


def test_file_level_problems(tmp_path: Path, pki: Pki) -> None:
    cases = {
        f"tls_server_config:\n  cert_file: {pki.server_cert}\n  key_file: {tmp_path}/absent.key\n": "absent.key",
        f"tls_server_config:\n  cert_file: {pki.server_cert}\n": "missing one of key or key_file",
        f"tls_server_config:\n  cert_file: {pki.server_cert}\n  key_file: {pki.client_key}\n": "failed to load",
        (
            f"tls_server_config:\n  cert_file: {pki.server_cert}\n  key_file: {pki.server_key}\n"
            f"  client_ca_file: {pki.ca}\n"
        ): "without a Client Auth Policy",
        (
            f"tls_server_config:\n  cert_file: {pki.server_cert}\n  key_file: {pki.server_key}\n"
            "  client_auth_type: RequireAnyClientCert\n"
        ): "cannot be enforced",
        (
            f"tls_server_config:\n  cert_file: {pki.server_cert}\n  key_file: {pki.server_key}\n"
            "  min_version: TLS13\n  max_version: TLS12\n"
        ): "above max_version",
        (
            f"tls_server_config:\n  cert_file: {pki.server_cert}\n  key_file: {pki.server_key}\n"
            "  client_allowed_sans: [x]\n"
        ): "client_allowed_sans requires",
        "rate_limit:\n  interval: 1s\n  burst: 0\n": "burst",
        "- a list\n": "expected a mapping",
        "a: [1\n": "invalid YAML",
    }
    for text, want in cases.items():
        with pytest.raises(ConfigError) as e:
            load_web_config(write(tmp_path, text))
        assert want in str(e.value), (text, str(e.value))


def test_relative_paths_inline_pem_and_empty_file(tmp_path: Path, pki: Pki) -> None:
    rel = pki.dir / "web.yml"  # cert paths relative to the file's directory, as exporter-toolkit does
    rel.write_text("tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n")
    assert load_web_config(rel).ssl_context is not None

    def block(p: Path) -> str:
        return "".join(f"    {ln}\n" for ln in p.read_text().splitlines())

    inline = "tls_server_config:\n  cert: |\n" + block(pki.server_cert) + "  key: |\n" + block(pki.server_key)
    assert load_web_config(write(tmp_path, inline)).ssl_context is not None
    empty = load_web_config(write(tmp_path, ""))
    assert empty.ssl_context is None and not empty.users and not empty.headers


def test_go_durations() -> None:
    assert parse_go_duration("1m30s") == 90 and parse_go_duration("250ms") == 0.25 and parse_go_duration("0") == 0
    with pytest.raises(ValueError):
        parse_go_duration("5 minutes")


def test_cli_bad_web_config_exits_2_listing_every_error(tmp_path: Path) -> None:
    p = write(tmp_path, "basic_auth_users:\n  bob: x\nhttp_server_config:\n  headers:\n    Server: z\n")
    r = subprocess.run(
        [sys.executable, "-m", "zmon", "watch", "--listen", "127.0.0.1:0", "--web.config.file", str(p)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert "2 error(s)" in r.stderr and "bob" in r.stderr and "Server" in r.stderr


# ------------------------------------------------------------------------------------------------ serving


def test_tls_basic_auth_headers_on_every_endpoint(tmp_path: Path, pki: Pki, serve) -> None:  # type: ignore[no-untyped-def]
    srv = serve(write(tmp_path, base_config(pki)))
    assert srv.url.startswith("https://")
    ctx = client_ctx(pki)
    for path in ("/metrics", "/healthz", "/readyz", "/nope"):
        code, headers, _ = get(srv, ctx, path)
        assert code == 401 and headers["WWW-Authenticate"].startswith("Basic"), path
        assert headers["X-Content-Type-Options"] == "nosniff"
    assert get(srv, ctx, "/metrics", basic(password="wrong"))[0] == 401
    assert get(srv, ctx, "/metrics", basic(user="mallory"))[0] == 401
    code, headers, _ = get(srv, ctx, "/healthz", basic())
    assert code == 200 and headers["Strict-Transport-Security"] == "max-age=31536000"
    # plain HTTP on the TLS port is refused (no handshake), never served
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"zmon" not in s.recv(1024)


def test_control_endpoint_needs_the_token_on_top_of_basic_auth(tmp_path: Path, pki: Pki, serve) -> None:  # type: ignore[no-untyped-def]
    srv = serve(write(tmp_path, base_config(pki)))
    ctx = client_ctx(pki)
    code, _, body = get(srv, ctx, "/act", basic(), method="POST", body=b"{}")
    assert code == 401 and b"X-Zmon-Token" in body
    code, _, _ = get(srv, ctx, "/act", {**basic(), "X-Zmon-Token": "wrong"}, method="POST", body=b"{}")
    assert code == 401
    code, _, _ = get(srv, ctx, "/act", {"X-Zmon-Token": "tok"}, method="POST", body=b"{}")
    assert code == 401  # the token alone does not pass basic auth
    code, _, _ = get(srv, ctx, "/act", {**basic(), "X-Zmon-Token": "tok"}, method="POST", body=b"{}")
    assert code == 202


def test_successful_bcrypt_checks_are_cached(tmp_path: Path, pki: Pki, serve, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls = []
    real = BasicAuth.verify

    def counting(self, user, password, hashed):  # type: ignore[no-untyped-def]
        calls.append(user)
        return real(self, user, password, hashed)

    monkeypatch.setattr(BasicAuth, "verify", counting)
    srv = serve(write(tmp_path, base_config(pki)))
    ctx = client_ctx(pki)
    for _ in range(5):
        assert get(srv, ctx, "/metrics", basic())[0] == 200
    assert calls == ["prometheus"]
    for _ in range(2):  # failures are not cached: each costs a bcrypt check (which throttles guessing)
        assert get(srv, ctx, "/metrics", basic(password="guess"))[0] == 401
    assert len(calls) == 3


def test_client_certificates(tmp_path: Path, pki: Pki, serve) -> None:  # type: ignore[no-untyped-def]
    tls = f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {pki.ca}\n"
    srv = serve(write(tmp_path, base_config(pki, tls_extra=tls)))
    assert get(srv, client_ctx(pki, cert=(pki.client_cert, pki.client_key)), "/healthz", basic())[0] == 200
    for cert in (None, (pki.rogue_cert, pki.rogue_key)):
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            get(srv, client_ctx(pki, cert=cert), "/healthz", basic())
    # client_allowed_sans: the CA-signed client has SAN prometheus.example; another name is closed
    sans = tls + "  client_allowed_sans: [grafana.example]\n"
    srv2 = serve(write(tmp_path, base_config(pki, tls_extra=sans)))
    with pytest.raises((ssl.SSLError, ConnectionError, OSError, http.client.HTTPException)):
        get(srv2, client_ctx(pki, cert=(pki.client_cert, pki.client_key)), "/healthz", basic())
    (tmp_path / "ok").mkdir()
    ok_sans = tls + "  client_allowed_sans: [prometheus.example]\n"
    srv3 = serve(write(tmp_path / "ok", base_config(pki, tls_extra=ok_sans)))
    assert get(srv3, client_ctx(pki, cert=(pki.client_cert, pki.client_key)), "/healthz", basic())[0] == 200


def test_min_version_and_cipher_suites(tmp_path: Path, pki: Pki, serve) -> None:  # type: ignore[no-untyped-def]
    srv = serve(write(tmp_path, base_config(pki, tls_extra="  min_version: TLS13\n")))
    with pytest.raises(ssl.SSLError):
        get(srv, client_ctx(pki, max_version=ssl.TLSVersion.TLSv1_2), "/healthz", basic())
    assert get(srv, client_ctx(pki), "/healthz", basic())[0] == 200
    (tmp_path / "c").mkdir()
    suites = "  max_version: TLS12\n  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384]\n"
    srv2 = serve(write(tmp_path / "c", base_config(pki, tls_extra=suites)))
    ctx = client_ctx(pki)
    with (
        socket.create_connection(("127.0.0.1", srv2.port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        assert s.version() == "TLSv1.2" and s.cipher()[0] == "ECDHE-ECDSA-AES256-GCM-SHA384"


def test_rate_limit_answers_429(tmp_path: Path, pki: Pki, serve) -> None:  # type: ignore[no-untyped-def]
    srv = serve(write(tmp_path, "rate_limit:\n  interval: 1h\n  burst: 2\n"))
    codes = []
    for _ in range(3):
        c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        c.request("GET", "/healthz")
        codes.append(c.getresponse().status)
        c.close()
    assert codes == [200, 200, 429]


def test_reload_on_change_and_broken_file_keeps_the_old_one(tmp_path: Path, pki: Pki, serve, caplog) -> None:  # type: ignore[no-untyped-def]
    p = write(tmp_path, base_config(pki))
    srv = serve(p)
    ctx = client_ctx(pki)
    assert "X-Frame-Options" not in get(srv, ctx, "/healthz", basic())[1]
    p.write_text(base_config(pki).replace("nosniff\n", "nosniff\n    X-Frame-Options: deny\n"))
    time.sleep(1.1)  # changes are looked for at most once a second
    assert get(srv, ctx, "/healthz", basic())[1]["X-Frame-Options"] == "deny"
    p.write_text("basic_auth_users: [broken\n")
    time.sleep(1.1)
    code, headers, _ = get(srv, ctx, "/healthz", basic())
    assert code == 200 and headers["X-Frame-Options"] == "deny"  # the previous config stays in force
    assert "keeping the previous one" in caplog.text and srv.web is not None and srv.web.failed_reloads == 1
    # a new password takes effect without a restart
    new_hash = bcrypt.hashpw(b"new", bcrypt.gensalt(4)).decode()
    p.write_text(base_config(pki).replace(HASH, new_hash))
    time.sleep(1.1)
    assert get(srv, ctx, "/healthz", basic())[0] == 401
    assert get(srv, ctx, "/healthz", basic(password="new"))[0] == 200


def test_app_routes_unchanged_without_web_config() -> None:
    app = make_app()
    assert app.handle(Request("GET", "/healthz", {}, {}, b"")).status == 200


def test_readme_example_is_a_valid_web_config(tmp_path: Path, pki: Pki) -> None:
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("### Web configuration file") :]
    example = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert example is not None
    p = pki.dir / "readme-web.yml"  # cert_file: server.pem / key_file: server.key, relative to the file
    p.write_text(example.group(1))
    web = load_web_config(p)
    assert web.ssl_context is not None and "prometheus" in web.users and web.headers
    assert bcrypt.checkpw(b"change-me", web.users["prometheus"])
