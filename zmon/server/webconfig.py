"""The exporter-toolkit web configuration file (`--web.config.file`): TLS, basic auth, response headers.

The same YAML that node_exporter, dcgm-exporter and nvidia_gpu_exporter take (prometheus/exporter-toolkit
docs/web-configuration.md): `tls_server_config`, `http_server_config`, `basic_auth_users` (bcrypt hashes),
`rate_limit`. Unknown keys are errors, as with Go's strict YAML decoding; relative paths are relative to the
file's directory. Every problem is reported at once (zmon.config.ConfigError → exit code 2 at start).

Where Python's ssl cannot do what Go's crypto/tls does, the file is refused with the reason instead of being
served with weaker settings: `client_auth_type: RequireAnyClientCert` (a certificate required but not
verified), several `curve_preferences` (Python sets one group), cipher suite names OpenSSL lacks.
`RequestClientCert` (asked for, never verified or required) grants the same access as `NoClientCert` and is
served as that. `http2` is accepted and ignored: zmon speaks HTTP/1.1 (ALPN http/1.1).

The file and the files it names are checked for changes (mtime, size, inode) at most once a second and
re-read when they change — certificates renewed on disk are picked up, as exporter-toolkit does on every
connection; a new file that does not validate is logged and the previous one stays in force.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import concurrent.futures
import contextlib
import enum
import hashlib
import ipaddress
import logging
import os
import re
import ssl
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from zmon.config import ConfigError, read_yaml_file

log = logging.getLogger(__name__)

TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
CLIENT_AUTH_TYPES = (
    "NoClientCert",
    "RequestClientCert",
    "RequireAnyClientCert",
    "VerifyClientCertIfGiven",
    "RequireAndVerifyClientCert",
)
_CLIENT_AUTH_ALIASES = {"RequireClientCert": "RequireAnyClientCert", "": "NoClientCert"}  # as exporter-toolkit
# Go's tls.CipherSuites() (the secure list, the only names exporter-toolkit accepts) → OpenSSL names.
GO_CIPHERS = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
}
# TLS 1.3 suites are in Go's list too but not configurable (in Go or OpenSSL's cipher string): accepted, no effect.
GO_TLS13_CIPHERS = frozenset({"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"})
GO_CURVES = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1", "X25519": "X25519"}
# exporter-toolkit's extraHTTPHeaders: the only headers it lets a file set, with the values it accepts (None: any).
ALLOWED_HEADERS: dict[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}
_BCRYPT_HASH = re.compile(r"^\$2[abxy]?\$(\d\d)\$[./A-Za-z0-9]{53}$")
_GO_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
CHECK_INTERVAL_SECONDS = 1.0  # how often the files are stat()ed for changes


def parse_go_duration(text: str) -> float:
    """Go's time.ParseDuration ("1s", "1m30s", "250ms", "0") in seconds; ValueError with the reason."""
    s = text.strip()
    if s in ("0", ""):
        return 0.0
    pos, total = 0, 0.0
    for m in _GO_DURATION.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s) or pos == 0:
        raise ValueError(f"not a Go duration (like 1s, 500ms, 1m30s): {text!r}")
    return total


# ------------------------------------------------------------------------------------------------ schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSServerConfig(_Strict):
    cert: str | None = None
    key: str | None = None
    client_ca: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    client_auth_type: str = "NoClientCert"
    client_ca_file: str | None = None
    client_allowed_sans: list[str] | None = None
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    cipher_suites: list[str] | None = None
    prefer_server_cipher_suites: bool = True
    curve_preferences: list[str] | None = None

    @field_validator("client_auth_type")
    @classmethod
    def _auth(cls, v: str) -> str:
        v = _CLIENT_AUTH_ALIASES.get(v, v)
        if v not in CLIENT_AUTH_TYPES:
            raise ValueError(f"invalid client_auth_type {v!r}; one of {', '.join(CLIENT_AUTH_TYPES)}")
        return v

    @field_validator("min_version", "max_version")
    @classmethod
    def _version(cls, v: str) -> str:
        if v not in TLS_VERSIONS:
            raise ValueError(f"unknown TLS version {v!r}; one of {', '.join(TLS_VERSIONS)}")
        return v

    @field_validator("cipher_suites")
    @classmethod
    def _ciphers(cls, v: list[str] | None) -> list[str] | None:
        bad = [c for c in v or () if c not in GO_CIPHERS and c not in GO_TLS13_CIPHERS]
        if bad:
            raise ValueError(
                f"unknown cipher {bad[0]!r} (Go's tls.CipherSuites() names, e.g. TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256)"
            )
        return v

    @field_validator("curve_preferences")
    @classmethod
    def _curves(cls, v: list[str] | None) -> list[str] | None:
        bad = [c for c in v or () if c not in GO_CURVES]
        if bad:
            raise ValueError(f"unknown curve {bad[0]!r}; one of {', '.join(GO_CURVES)}")
        if v and len(v) > 1:
            raise ValueError(
                "zmon (Python's ssl) can set only one curve: list one, or leave it out for OpenSSL's "
                "defaults (X25519, P-256, P-384, P-521)"
            )
        return v

    def enabled(self) -> bool:
        """TLS is on when any certificate, key, client CA or client auth setting is given (exporter-toolkit)."""
        return bool(
            self.cert_file
            or self.cert
            or self.key_file
            or self.key
            or self.client_ca_file
            or self.client_ca
            or ("client_auth_type" in self.model_fields_set)
        )


class HTTPServerConfig(_Strict):
    http2: bool = True  # accepted for compatibility; zmon serves HTTP/1.1
    headers: dict[str, str] | None = None

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        problems = []
        for k, val in (v or {}).items():
            allowed = ALLOWED_HEADERS.get(k)
            if k not in ALLOWED_HEADERS:
                problems.append(f"HTTP header {k!r} can not be configured (allowed: {', '.join(ALLOWED_HEADERS)})")
            elif allowed is not None and val not in allowed:
                problems.append(f"invalid value for {k}: expected one of {list(allowed)}, got {val!r}")
            elif "\r" in val or "\n" in val:
                problems.append(f"{k}: a header value cannot contain a line break")
        if problems:
            raise ValueError("; ".join(problems))
        return v


class RateLimitConfig(_Strict):
    interval: str = "0"
    burst: int = 0

    @field_validator("interval")
    @classmethod
    def _interval(cls, v: str) -> str:
        parse_go_duration(v)
        return v


class WebConfigFile(_Strict):
    tls_server_config: TLSServerConfig | None = None
    http_server_config: HTTPServerConfig | None = None
    basic_auth_users: dict[str, str] | None = None
    rate_limit: RateLimitConfig | None = None

    @field_validator("basic_auth_users")
    @classmethod
    def _users(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        for user, h in (v or {}).items():
            m = _BCRYPT_HASH.match(str(h))
            if not m or not 4 <= int(m.group(1)) <= 31:
                raise ValueError(f"user {user!r}: not a bcrypt hash (htpasswd -nBC 10 \"\" | tr -d ':\\n')")
        return v


# ------------------------------------------------------------------------------------------------ runtime


class TokenBucket:
    """rate_limit: `burst` requests at once, refilled one per `interval` (golang.org/x/time/rate semantics)."""

    def __init__(self, interval: float, burst: int) -> None:
        self.interval, self.burst = interval, burst
        self._tokens = float(burst)
        self._at = time.monotonic()
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._at) / self.interval)
            self._at = now
            if self._tokens >= 1:
                self._tokens -= 1
                return True
            return False


class AuthVerdict(enum.Enum):
    OK = "ok"
    DENIED = "denied"
    BUSY = "busy"  # too many uncached password checks queued


class BasicAuth:
    """Checks `Authorization: Basic` against bcrypt hashes. bcrypt costs ~60 ms a check (cost 10) by design, so
    a successful (user, password, hash) is remembered (as exporter-toolkit does) and Prometheus' scrapes cost a
    hash lookup; checks run one at a time on their own thread (exporter-toolkit's bcryptMtx), never on the event
    loop or the handler workers, and at most `max_pending` wait (the rest get 503) so a password-guessing flood
    cannot starve scrapes. An unknown user is checked against a fixed hash, so timing tells no user names."""

    CACHE_SIZE = 100

    def __init__(self, max_pending: int = 32) -> None:
        self._cache: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="zmon-http-bcrypt")
        self._pending = 0
        self.max_pending = max_pending
        self._fake_hash: bytes | None = None

    @staticmethod
    def parse(header: str | None) -> tuple[str, str] | None:
        if not header:
            return None
        scheme, _, cred = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, sep, password = base64.b64decode(cred.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, ValueError):
            return None
        return (user, password) if sep else None

    @staticmethod
    def _key(user: str, password: str, hashed: bytes) -> bytes:
        return hashlib.sha256(b"\0".join((user.encode(), hashed, password.encode()))).digest()

    def cached(self, user: str, password: str, hashed: bytes) -> bool:
        with self._lock:
            return self._key(user, password, hashed) in self._cache

    def verify(self, user: str, password: str, hashed: bytes | None) -> bool:
        """The bcrypt check (slow); remembers a success."""
        if hashed is None:
            if self._fake_hash is None:
                self._fake_hash = bcrypt.hashpw(b"zmon: no such user", bcrypt.gensalt(10))
            bcrypt.checkpw(password.encode(), self._fake_hash)
            return False
        try:
            ok = bcrypt.checkpw(password.encode(), hashed)
        except ValueError:  # validated at load; a hash bcrypt still refuses denies, never 500s
            return False
        if ok:
            with self._lock:
                self._cache[self._key(user, password, hashed)] = None
                while len(self._cache) > self.CACHE_SIZE:
                    self._cache.popitem(last=False)
        return ok

    async def check(self, header: str | None, users: Mapping[str, bytes]) -> AuthVerdict:
        cred = self.parse(header)
        if cred is None:
            return AuthVerdict.DENIED
        user, password = cred
        hashed = users.get(user)
        if hashed is not None and self.cached(user, password, hashed):
            return AuthVerdict.OK
        if self._pending >= self.max_pending:
            return AuthVerdict.BUSY
        self._pending += 1  # event loop thread only
        try:
            ok = await asyncio.get_running_loop().run_in_executor(self._pool, self.verify, user, password, hashed)
        finally:
            self._pending -= 1
        return AuthVerdict.OK if ok and hashed is not None else AuthVerdict.DENIED

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class WebConfig:
    """A validated web configuration, ready to serve with."""

    path: Path
    ssl_context: ssl.SSLContext | None = None
    allowed_sans: frozenset[str] | None = None
    users: dict[str, bytes] = field(default_factory=dict)
    headers: tuple[tuple[str, str], ...] = ()
    rate_limit: tuple[float, int] | None = None
    files: tuple[Path, ...] = ()  # the config and every file it names (watched for changes)
    limiter: TokenBucket | None = None
    auth: BasicAuth | None = None


def _resolve(base: Path, name: str | None) -> Path | None:
    if not name:
        return None
    p = Path(name).expanduser()
    return p if p.is_absolute() else base / p


def _ssl_context(tls: TLSServerConfig, base: Path, problems: list[str]) -> tuple[ssl.SSLContext | None, list[Path]]:
    files: list[Path] = []
    where = "tls_server_config"
    if tls.cert and tls.cert_file:
        problems.append(f"{where}: cert and cert_file are both set; give one")
    if tls.key and tls.key_file:
        problems.append(f"{where}: key and key_file are both set; give one")
    if tls.client_ca and tls.client_ca_file:
        problems.append(f"{where}: client_ca and client_ca_file are both set; give one")
    if not (tls.cert or tls.cert_file):
        problems.append(f"{where}: missing one of cert or cert_file")
    if not (tls.key or tls.key_file):
        problems.append(f"{where}: missing one of key or key_file")
    auth = tls.client_auth_type
    has_ca = bool(tls.client_ca or tls.client_ca_file)
    if auth == "RequireAnyClientCert":
        problems.append(
            f"{where}.client_auth_type: RequireAnyClientCert (a client certificate required but never "
            "verified) cannot be enforced with Python's ssl; use RequireAndVerifyClientCert with "
            "client_ca_file"
        )
    if has_ca and auth == "NoClientCert":
        problems.append(
            f"{where}: client CA's have been configured without a Client Auth Policy (set client_auth_type)"
        )
    if tls.client_allowed_sans is not None and auth not in ("RequireAnyClientCert", "RequireAndVerifyClientCert"):
        problems.append(f"{where}: client_allowed_sans requires client_auth_type RequireAndVerifyClientCert")
    if TLS_VERSIONS[tls.min_version] > TLS_VERSIONS[tls.max_version]:
        problems.append(f"{where}: min_version {tls.min_version} is above max_version {tls.max_version}")
    if problems:
        return None, files

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.minimum_version = TLS_VERSIONS[tls.min_version]
        ctx.maximum_version = TLS_VERSIONS[tls.max_version]
    except (ValueError, ssl.SSLError) as e:
        problems.append(f"{where}: this OpenSSL cannot use {tls.min_version}..{tls.max_version}: {e}")
    if tls.prefer_server_cipher_suites:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    with tempfile.TemporaryDirectory(prefix="zmon-tls-") as tmp:  # inline PEM: ssl loads only from files
        cert_path = _resolve(base, tls.cert_file)
        key_path = _resolve(base, tls.key_file)
        if tls.cert:
            cert_path = Path(tmp) / "cert.pem"
            cert_path.write_text(tls.cert)
        else:
            assert cert_path is not None
            files.append(cert_path)
        if tls.key:
            key_path = Path(tmp) / "key.pem"
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(tls.key)
        else:
            assert key_path is not None
            files.append(key_path)
        missing = [f"{where}: cannot read {p}: no such file" for p in (cert_path, key_path) if not p.is_file()]
        problems += missing
        try:
            if not missing:
                ctx.load_cert_chain(cert_path, key_path)
        except (OSError, ssl.SSLError) as e:
            problems.append(
                f"{where}: failed to load the certificate and key ({tls.cert_file or 'cert'}, "
                f"{tls.key_file or 'key'}): {getattr(e, 'strerror', None) or e}"
            )
    ca_path = _resolve(base, tls.client_ca_file)
    if ca_path is not None or tls.client_ca:
        try:
            if ca_path is not None:
                files.append(ca_path)
                ctx.load_verify_locations(cafile=str(ca_path))
            else:
                ctx.load_verify_locations(cadata=tls.client_ca)
            if not ctx.cert_store_stats().get("x509_ca") and not ctx.cert_store_stats().get("x509"):
                problems.append(f"{where}: no certificates found in the client CA")
        except FileNotFoundError as e:
            problems.append(f"{where}.client_ca_file: cannot read {e.filename}: {e.strerror}")
        except (OSError, ssl.SSLError, ValueError) as e:
            problems.append(f"{where}: client CA could not be loaded: {e}")
    if auth in ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert"):
        ctx.verify_mode = ssl.CERT_OPTIONAL if auth == "VerifyClientCertIfGiven" else ssl.CERT_REQUIRED
        if not has_ca:  # Go verifies against the system roots when no client CA is given
            ctx.load_default_certs(ssl.Purpose.CLIENT_AUTH)
    else:  # NoClientCert; RequestClientCert asks but neither requires nor verifies: the same access
        ctx.verify_mode = ssl.CERT_NONE
    if tls.cipher_suites:
        names = [GO_CIPHERS[c] for c in tls.cipher_suites if c in GO_CIPHERS]
        for go, name in zip([c for c in tls.cipher_suites if c in GO_CIPHERS], names, strict=True):
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(name)
            except ssl.SSLError:
                problems.append(f"{where}.cipher_suites: {go} ({name}) is not available in {ssl.OPENSSL_VERSION}")
        if names and not problems:
            ctx.set_ciphers(":".join(names))
    if tls.curve_preferences:
        try:
            ctx.set_ecdh_curve(GO_CURVES[tls.curve_preferences[0]])
        except (ValueError, ssl.SSLError) as e:
            problems.append(f"{where}.curve_preferences: {tls.curve_preferences[0]}: {e}")
    ctx.set_alpn_protocols(["http/1.1"])
    return (None if problems else ctx), files


def load_web_config(path: Path) -> WebConfig:
    """Read and validate a web configuration file; raises ConfigError listing every problem."""
    source = str(path)
    # zmon's YAML reader: a size cap, UTF-8 only, nesting / alias / integer limits; every problem a ConfigError
    data: Any = read_yaml_file(path, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"(top level): expected a mapping, got {type(data).__name__}"], source)
    try:
        parsed = WebConfigFile.model_validate(data)
    except ValidationError as e:
        errors = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            errors.append(f"{loc}: {msg}")
        raise ConfigError(errors, source) from None

    problems: list[str] = []
    base = path.parent
    web = WebConfig(path=path, files=(path,))
    if parsed.tls_server_config is not None and parsed.tls_server_config.enabled():
        tls = parsed.tls_server_config
        web.ssl_context, files = _ssl_context(tls, base, problems)
        web.files += tuple(files)
        if tls.client_allowed_sans is not None:
            web.allowed_sans = frozenset(_normalise_san(s) for s in tls.client_allowed_sans)
    if parsed.http_server_config is not None and parsed.http_server_config.headers:
        web.headers = tuple((k, v) for k, v in parsed.http_server_config.headers.items() if v)
    web.users = {u: h.encode() for u, h in (parsed.basic_auth_users or {}).items()}
    if parsed.rate_limit is not None:
        interval = parse_go_duration(parsed.rate_limit.interval)
        if interval > 0:
            if parsed.rate_limit.burst < 1:
                problems.append("rate_limit.burst: must be >= 1 when rate_limit.interval is set (0 lets nothing in)")
            else:
                web.rate_limit = (interval, parsed.rate_limit.burst)
    if problems:
        raise ConfigError(problems, source)
    return web


def _normalise_san(value: str) -> str:
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(value))
    return value


def _signature(files: Iterable[Path]) -> tuple[tuple[int, int, int] | None, ...]:
    out: list[tuple[int, int, int] | None] = []
    for f in files:
        try:
            st = f.stat()
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append(None)
    return tuple(out)


class WebConfigWatcher:
    """The web configuration in force: loaded (and validated) at construction, re-read when the file or a file it
    names changes, the previous one kept when the new one is broken. `get()` is cheap (one stat a second)."""

    def __init__(self, path: Path, clock: Any = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self.auth = BasicAuth()
        self.current = self._adopt(load_web_config(path), None)
        self._sig = _signature(self.current.files)
        self._checked = clock()
        self.reloads = 0
        self.failed_reloads = 0

    def _adopt(self, new: WebConfig, old: WebConfig | None) -> WebConfig:
        new.auth = self.auth
        if new.rate_limit is not None:
            keep = old is not None and old.rate_limit == new.rate_limit and old.limiter is not None
            new.limiter = old.limiter if keep and old is not None else TokenBucket(*new.rate_limit)
        return new

    def get(self) -> WebConfig:
        now = self._clock()
        if now - self._checked < CHECK_INTERVAL_SECONDS:
            return self.current
        self._checked = now
        sig = _signature(self.current.files)
        if sig == self._sig:
            return self.current
        self._sig = sig  # a broken file is reported once, then again only when it changes
        try:
            new = load_web_config(self.path)
            if (new.ssl_context is None) != (self.current.ssl_context is None):
                raise ConfigError(["switching TLS on or off needs a restart of zmon"], str(self.path))
        except ConfigError as e:
            self.failed_reloads += 1
            log.error("web config changed but is not valid; keeping the previous one: %s", e)
            return self.current
        self.current = self._adopt(new, self.current)
        self._sig = _signature(self.current.files)
        self.reloads += 1
        log.info(
            "web config %s reloaded (TLS %s, %d basic auth user(s))",
            self.path,
            "on" if new.ssl_context else "off",
            len(new.users),
        )
        return self.current

    def close(self) -> None:
        self.auth.close()


__all__ = ["AuthVerdict", "BasicAuth", "WebConfig", "WebConfigWatcher", "load_web_config", "parse_go_duration"]
