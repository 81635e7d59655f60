"""Talking to a running zmon: `zmon diagnose --url` fetches its live diagnosis."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit, urlunsplit


class DiagnosisUnavailable(Exception):
    """The daemon could not be reached or did not answer with a diagnosis."""


def diagnosis_url(base: str) -> str:
    """'http://host:port' (or '.../diagnosis') → the /diagnosis URL; ValueError for anything else."""
    parts = urlsplit(base.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http(s) URL such as http://127.0.0.1:8739, got {base!r}")
    _ = parts.port  # raises ValueError for a malformed port
    path = parts.path.rstrip("/")
    if not path.endswith("/diagnosis"):
        path += "/diagnosis"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _error_text(e: urllib.error.HTTPError) -> str:
    """zmon's own reason (the JSON `error` field of a 4xx/5xx answer), else the HTTP reason phrase."""
    try:
        doc = json.loads(e.read(64 * 1024) or b"null")
    except (ValueError, OSError):
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return str(doc["error"])
    return str(e.reason)


def fetch_diagnosis(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET the daemon's /diagnosis document; raises DiagnosisUnavailable with the reason."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as e:
        text = _error_text(e)
        if e.code == 404:
            text += " (a live diagnosis is served by `zmon run` and `zmon.attach`, not by `zmon watch`)"
        raise DiagnosisUnavailable(f"{url}: HTTP {e.code}: {text}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DiagnosisUnavailable(f"cannot reach {url}: {reason}") from None
    try:
        doc = json.loads(body)
    except ValueError:
        raise DiagnosisUnavailable(f"{url} did not answer with JSON") from None
    if not isinstance(doc, dict) or "verdict" not in doc:
        raise DiagnosisUnavailable(f"{url} did not answer with a zmon diagnosis")
    return doc
