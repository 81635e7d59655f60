"""Alertmanager v2 client: POST /api/v2/alerts to every configured URL from background threads.

Usage::

    client = AlertmanagerClient(config.alerting, generator_url="http://host:8739/metrics")
    client.start()
    client.fire(alert)      # zmon.policy.engine.Alert; returns at once (queued per URL)
    client.resolve(alert)   # sends endsAt = now, so Alertmanager resolves it
    client.stats()          # DeliveryStats(ok, error, dropped, active, queued) for the policy collector
    client.close()

Each URL has its own worker thread and bounded queue (the oldest delivery is dropped, and counted, when it is
full), so a dead Alertmanager never delays the others, and sampling and generation never wait for HTTP.
Active alerts are re-sent every `resend_seconds`: Alertmanager expires an alert without endsAt after its
`resolve_timeout`. Network errors, 5xx and 429 are retried with exponential backoff; other 4xx are not.
Counts are per alert per URL: an alert delivered to two Alertmanagers counts 2 under result="ok".
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from zmon.config import AlertingConfig
from zmon.policy.engine import Alert
from zmon.version import __version__

# Every zmon serves its runbooks here (zmon.server.runbooks); the default target of runbook_url.
RUNBOOKS_PATH = "/runbooks"

log = logging.getLogger(__name__)

API_PATH = "/api/v2/alerts"
JOB = "zmon"

Payload = dict[str, Any]


def rfc3339(unix_seconds: float) -> str:
    """2026-11-25T10:00:00.123Z: the timestamp format Alertmanager's API expects."""
    t = dt.datetime.fromtimestamp(unix_seconds, tz=dt.timezone.utc)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class DeliveryStats:
    ok: int  # alerts delivered (per URL)
    error: int  # alerts given up on after retries (per URL)
    dropped: int  # alerts dropped from a full queue (per URL)
    active: int  # alerts currently firing, re-sent every resend_seconds
    queued: int  # deliveries waiting in the queues


class _Worker:
    """One Alertmanager URL: a bounded queue of batches and the thread that posts them."""

    def __init__(self, client: AlertmanagerClient, url: str) -> None:
        self.client = client
        self.url = url
        self.endpoint = url.rstrip("/") + API_PATH
        self.queue: deque[list[Payload]] = deque()
        self.cond = threading.Condition()
        self.busy = False
        self.failing = False
        self.next_resend = 0.0
        self.thread = threading.Thread(target=self._run, name=f"zmon-alerts:{url}", daemon=True)

    def enqueue(self, batch: list[Payload]) -> int:
        """Queue a batch; returns how many alerts were dropped to make room."""
        dropped = 0
        with self.cond:
            while len(self.queue) >= self.client.config.queue_size:
                dropped += len(self.queue.popleft())
            self.queue.append(batch)
            self.cond.notify_all()
        return dropped

    def _run(self) -> None:
        c = self.client
        self.next_resend = c._clock() + c.config.resend_seconds
        while True:
            with self.cond:
                while not self.queue and not c._stopping.is_set():
                    left = self.next_resend - c._clock()
                    if left <= 0:
                        break
                    self.cond.wait(min(left, 1.0))
                if c._stopping.is_set() and (not self.queue or c._clock() > c._drain_deadline):
                    self.cond.notify_all()
                    return
                batch = self.queue.popleft() if self.queue else None
                self.busy = True
            try:
                if batch is None:  # resend every active alert so Alertmanager does not expire them
                    self.next_resend = c._clock() + c.config.resend_seconds
                    batch = c._active_payloads()
                if batch:
                    ok = c._post(self, batch)
                    c._count("ok" if ok else "error", len(batch))
            except Exception:  # a bug here must not kill the worker
                log.exception("alert delivery to %s failed unexpectedly", self.url)
            finally:
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()

    def idle(self) -> bool:
        with self.cond:
            return not self.queue and not self.busy


class AlertmanagerClient:
    """Sends zmon alerts to Alertmanager (v2 API). Implements zmon.policy.actions.AlertSink."""

    def __init__(
        self,
        config: AlertingConfig,
        *,
        generator_url: str | None = None,
        instance: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.generator_url = generator_url
        # Without alerting.runbook_base_url: the runbooks served by the zmon that sends the alert (GET /runbooks).
        self.runbook_base_url = config.runbook_base_url
        if self.runbook_base_url is None and generator_url:
            parts = urlsplit(generator_url)
            self.runbook_base_url = urlunsplit((parts.scheme, parts.netloc, RUNBOOKS_PATH, "", "")) + "#runbook-"
        self.instance = instance or config.instance or socket.gethostname()
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._active: dict[tuple[tuple[str, str], ...], Alert] = {}
        self._counts = {"ok": 0, "error": 0, "dropped": 0}
        self._stopping = threading.Event()
        self._drain_deadline = float("inf")
        self._started = False
        ctx = ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)
        self._opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx))
        self._workers = [_Worker(self, u) for u in config.alertmanager_urls]

    # ------------------------------------------------------------------------------------ public API

    def start(self) -> None:
        """Start the worker threads (also done by the first fire/resolve)."""
        with self._lock:
            if self._started:
                return
            self._started = True
        for w in self._workers:
            w.thread.start()

    def fire(self, alert: Alert) -> None:
        """Mark an alert active and queue it for every URL; returns immediately."""
        with self._lock:
            self._active[alert.key()] = alert
        self._send([alert])

    def resolve(self, alert: Alert) -> None:
        """Queue the alert with endsAt (now if unset) for every URL; it stops being re-sent."""
        if alert.ends_at is None:
            alert = alert.resolved(self._wall())
        with self._lock:
            self._active.pop(alert.key(), None)
        self._send([alert])

    def active(self) -> list[Alert]:
        with self._lock:
            return list(self._active.values())

    def stats(self) -> DeliveryStats:
        queued = 0
        for w in self._workers:
            with w.cond:
                queued += len(w.queue)
        with self._lock:
            return DeliveryStats(
                self._counts["ok"], self._counts["error"], self._counts["dropped"], len(self._active), queued
            )

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queue is empty and no delivery is in flight (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        for w in self._workers:
            with w.cond:
                while w.queue or w.busy:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    w.cond.wait(min(left, 0.1))
        return True

    def close(self, timeout: float = 5.0, *, resolve_active: bool = False) -> None:
        """Stop the workers after at most `timeout` seconds of draining the queues.

        `resolve_active` sends endsAt for every active alert first (for a deliberate shutdown of the
        watched service); by default active alerts are left to expire in Alertmanager.
        """
        if resolve_active:
            for a in self.active():
                self.resolve(a)
        self._drain_deadline = self._clock() + timeout
        self._stopping.set()
        for w in self._workers:
            with w.cond:
                w.cond.notify_all()
        if self._started:
            for w in self._workers:
                w.thread.join(timeout + 1.0)

    def payload(self, alert: Alert) -> Payload:
        """The Alertmanager v2 JSON object for one alert."""
        labels: dict[str, str] = dict(self.config.external_labels)
        labels.update({"job": JOB, "instance": self.instance})
        labels.update(alert.label_dict())
        annotations = {"summary": alert.summary}
        if alert.description:
            annotations["description"] = alert.description
        if alert.value is not None:
            annotations["value"] = f"{alert.value:g}"
        if self.runbook_base_url:
            annotations["runbook_url"] = self.runbook_base_url + alert.alertname.lower()
        out: Payload = {"labels": labels, "annotations": annotations, "startsAt": rfc3339(alert.starts_at)}
        if alert.ends_at is not None:
            out["endsAt"] = rfc3339(alert.ends_at)
        if self.generator_url:
            out["generatorURL"] = self.generator_url
        return out

    # ------------------------------------------------------------------------------------ internals

    def _send(self, alerts: list[Alert]) -> None:
        if not self._workers:
            return
        self.start()
        batch = [self.payload(a) for a in alerts]
        for w in self._workers:
            dropped = w.enqueue(batch)
            if dropped:
                self._count("dropped", dropped)
                log.warning("alert queue for %s full: dropped %d alert(s)", w.url, dropped)

    def _active_payloads(self) -> list[Payload]:
        with self._lock:
            alerts = list(self._active.values())
        return [self.payload(a) for a in alerts]

    def _count(self, result: str, n: int) -> None:
        with self._lock:
            self._counts[result] += n

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json", "User-Agent": f"zmon/{__version__}"}
        ba = self.config.basic_auth
        if ba is not None:
            password = ba.password_file.read_text().rstrip("\r\n")
            cred = base64.b64encode(f"{ba.username}:{password}".encode()).decode()
            h["Authorization"] = f"Basic {cred}"
        elif self.config.bearer_token_file is not None:
            h["Authorization"] = f"Bearer {self.config.bearer_token_file.read_text().strip()}"
        return h

    def _post(self, w: _Worker, batch: list[Payload]) -> bool:
        """POST one batch with retries; True when Alertmanager accepted it."""
        body = json.dumps(batch).encode()
        cfg = self.config
        error = ""
        for attempt in range(cfg.retries + 1):
            if attempt:
                delay = min(cfg.max_backoff_seconds, cfg.backoff_seconds * 2 ** (attempt - 1))
                if self._stopping.wait(delay) and self._clock() > self._drain_deadline:
                    break
            try:
                req = urllib.request.Request(w.endpoint, data=body, headers=self._headers(), method="POST")
                with self._opener.open(req, timeout=cfg.timeout_seconds) as resp:
                    resp.read()
                if w.failing:
                    log.info("alert delivery to %s recovered", w.url)
                w.failing = False
                return True
            except urllib.error.HTTPError as e:
                detail = e.read(500).decode(errors="replace").strip()
                error = f"HTTP {e.code}: {detail}"
                if e.code < 500 and e.code != 429:  # the request itself is wrong: retrying cannot help
                    break
            except (OSError, ValueError) as e:  # URLError, timeouts, refused connections, unreadable secrets
                error = f"{type(e).__name__}: {e}"
        level = logging.DEBUG if w.failing else logging.WARNING
        log.log(level, "alert delivery to %s failed after %d attempt(s): %s", w.url, attempt + 1, error)
        w.failing = True
        return False
