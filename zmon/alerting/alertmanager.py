"""Alertmanager v2 client: POST /api/v2/alerts to every configured URL from background threads.

Usage::

    client = AlertmanagerClient(config.alerting, generator_url="http://host:8739/metrics")
    client.start()
    client.fire(alert)      # zmon.policy.engine.Alert; returns at once (queued per URL)
    client.resolve(alert)   # sends endsAt = now, so Alertmanager resolves it
    client.stats()          # DeliveryStats(ok, error, dropped, active, queued) for the policy collector
    client.reconfigure(new_config)  # a reload: URLs added or removed, labels changed (alerts follow)
    client.close(resolve_active=True)  # zmon stops: its alerts resolve now, not after resolve_timeout

Each URL has its own worker thread and bounded queue (the oldest delivery is dropped, and counted, when it is
full), so a dead Alertmanager never delays the others, and sampling and generation never wait for HTTP.
Active alerts are re-sent every `resend_seconds`: Alertmanager expires an alert without endsAt after its
`resolve_timeout`. Network errors, 5xx and 429 are retried with exponential backoff; other 4xx are not.
Counts are per alert per URL: an alert delivered to two Alertmanagers counts 2 under result="ok".
A client with no URL sends nothing but still tracks the active alerts, so a reload that adds a URL delivers
them there.
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
from collections.abc import Callable, Iterable
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
        self.stopping = threading.Event()
        self.deadline = float("inf")  # monotonic: stop draining the queue after this once stopping
        self.thread = threading.Thread(target=self._run, name=f"zmon-alerts:{url}", daemon=True)

    def stop(self, timeout: float) -> None:
        """Deliver what is queued for at most `timeout` seconds more, then end the thread."""
        self.deadline = self.client._clock() + timeout
        self.stopping.set()
        with self.cond:
            self.cond.notify_all()

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
                while not self.queue and not self.stopping.is_set():
                    left = self.next_resend - c._clock()
                    if left <= 0:
                        break
                    self.cond.wait(min(left, 1.0))
                if self.stopping.is_set() and (not self.queue or c._clock() > self.deadline):
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
        instance: str | Callable[[], str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.generator_url = generator_url
        # `instance` (a callable is asked at each send: the composition root knows the bound address only once
        # the server runs) is the default; alerting.instance, when set, wins.
        self._default_instance = instance
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._reconfigure_lock = threading.Lock()
        self._active: dict[tuple[tuple[str, str], ...], Alert] = {}
        self._counts = {"ok": 0, "error": 0, "dropped": 0}
        self._started = False
        self._closed = False
        self._opener = self._build_opener(config)
        self._workers = [_Worker(self, u) for u in config.alertmanager_urls]

    @staticmethod
    def _build_opener(config: AlertingConfig) -> urllib.request.OpenerDirector:
        ctx = ssl.create_default_context(cafile=str(config.ca_file.expanduser()) if config.ca_file else None)
        return urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx))

    @property
    def instance(self) -> str:
        """The `instance` label: alerting.instance, else the composition root's default, else the host name."""
        if self.config.instance:
            return self.config.instance
        default = self._default_instance
        value = default() if callable(default) else default
        return value or socket.gethostname()

    @property
    def runbook_base_url(self) -> str | None:
        """alerting.runbook_base_url, else the runbooks served by the zmon that sends the alert (GET /runbooks)."""
        if self.config.runbook_base_url is not None:
            return self.config.runbook_base_url
        if not self.generator_url:
            return None
        parts = urlsplit(self.generator_url)
        return urlunsplit((parts.scheme, parts.netloc, RUNBOOKS_PATH, "", "")) + "#runbook-"

    @property
    def enabled(self) -> bool:
        """True when there is at least one Alertmanager to send to."""
        return bool(self._workers)

    # ------------------------------------------------------------------------------------ public API

    def start(self) -> None:
        """Start the worker threads (also done by the first fire/resolve)."""
        with self._lock:
            if self._started:
                return
            self._started = True
            workers = list(self._workers)
        for w in workers:
            w.thread.start()

    def reconfigure(self, config: AlertingConfig, *, instance: object = ..., timeout: float = 5.0) -> None:
        """Adopt a new alerting configuration (a reload) without losing the alerts in force.

        URLs that stay keep their queue and thread; a removed URL gets endsAt for every active alert (it will
        not hear from zmon again), then its thread ends within `timeout`; an added URL gets every active
        alert. When the labels change (instance, external_labels), the alerts under the old labels are
        resolved and sent again under the new ones, since Alertmanager identifies an alert by its labels.
        """
        with self._reconfigure_lock:
            before = self._active_payloads()
            opener = self._build_opener(config) if config.ca_file != self.config.ca_file else self._opener
            with self._lock:
                self.config = config
                if instance is not ...:
                    self._default_instance = instance  # type: ignore[assignment]
                self._opener = opener
            after = self._active_payloads()
            relabelled = [p["labels"] for p in before] != [p["labels"] for p in after]
            ended = [{**p, "endsAt": rfc3339(self._wall())} for p in before]
            old = {w.url: w for w in self._workers}
            workers = [old.get(u) or _Worker(self, u) for u in config.alertmanager_urls]
            gone = [w for u, w in old.items() if u not in config.alertmanager_urls]
            with self._lock:
                self._workers = workers
                started = self._started
            for w in gone:
                if ended:
                    w.enqueue(ended)
                w.stop(timeout)
            for w in workers:
                if w.url not in old:
                    if started:
                        w.thread.start()
                    if after:
                        self._queue(w, after)
                elif relabelled:
                    if ended:
                        self._queue(w, ended)
                    if after:
                        self._queue(w, after)
            if (ended or after) and not started and workers:
                self.start()
            for w in gone:
                if w.thread.is_alive():
                    w.thread.join(timeout + 1.0)

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
        """Stop the workers after at most `timeout` seconds of draining the queues; idempotent.

        `resolve_active` sends endsAt for every active alert first (zmon stops: alerting.resolve_on_shutdown),
        so they resolve now; otherwise they are left to expire after Alertmanager's resolve_timeout.
        """
        with self._reconfigure_lock:
            if self._closed:
                return
            self._closed = True
            if resolve_active:
                active = self.active()
                for a in active:
                    self.resolve(a)
                if active:
                    log.info("resolving %d active alert(s) on shutdown", len(active))
            with self._lock:
                workers = list(self._workers)
                started = self._started
            for w in workers:
                w.stop(timeout)
            if started:
                for w in workers:
                    if w.thread.is_alive():
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
        with self._lock:
            workers = list(self._workers)
        if not workers:
            return
        self.start()
        batch = [self.payload(a) for a in alerts]
        for w in workers:
            self._queue(w, batch)

    def _queue(self, w: _Worker, batch: Iterable[Payload]) -> None:
        dropped = w.enqueue(list(batch))
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
                if w.stopping.wait(delay) and self._clock() > w.deadline:
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
