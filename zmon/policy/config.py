"""Configuration sections `policy:` and `alerting:` (frozen pydantic models, unknown keys rejected).

Mount them into the main Config as `policy: PolicyConfig = PolicyConfig()` and
`alerting: AlertingConfig = AlertingConfig()`. Defaults and meaning of every key are in the field comments.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from zmon.policy.rules import Rule, default_rules

_LABEL_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PolicyConfig(_Section):
    """Rules over sampled figures → actions at safe points (empty_cache, gc_collect) and alerts."""

    enabled: bool = True
    # Decisions are logged and counted with result="dry_run" but no remedial action runs;
    # alerts are still sent.
    dry_run: bool = False
    # Call empty_cache after every N-th generation (a safe point) regardless of rules; null = off.
    periodic_empty_cache_generations: int | None = Field(None, gt=0)
    rules: tuple[Rule, ...] = Field(default_factory=lambda: tuple(default_rules()))

    @field_validator("rules")
    @classmethod
    def _unique(cls, v: tuple[Rule, ...]) -> tuple[Rule, ...]:
        names = [r.name for r in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"rule names must be unique; repeated: {', '.join(dup)}")
        return v


class BasicAuthConfig(_Section):
    username: str
    password_file: Path  # read at each send, so a rotated secret is picked up


class AlertingConfig(_Section):
    """Alertmanager v2 client. No URLs = alerting off (alert actions are then only logged and counted)."""

    alertmanager_urls: tuple[str, ...] = ()  # e.g. ["http://127.0.0.1:9093"]; each gets every alert
    # Active alerts are re-sent this often: Alertmanager expires an alert without endsAt after its
    # resolve_timeout (default 5m).
    resend_seconds: float = Field(60.0, gt=0)
    timeout_seconds: float = Field(5.0, gt=0)  # per HTTP request
    retries: int = Field(3, ge=0)  # extra attempts per delivery on network errors, 5xx and 429
    backoff_seconds: float = Field(0.5, gt=0)  # first retry delay; doubles per attempt
    max_backoff_seconds: float = Field(8.0, gt=0)
    queue_size: int = Field(1000, gt=0)  # pending deliveries per URL; the oldest is dropped (and counted)
    basic_auth: BasicAuthConfig | None = None
    bearer_token_file: Path | None = None
    ca_file: Path | None = None  # CA bundle for https URLs (default: the system store)
    runbook_base_url: str = "https://github.com/zmon/zmon/blob/main/README.md#runbook-"  # + alertname in lower case
    instance: str | None = None  # label `instance`; null = this host's name
    external_labels: dict[str, str] = Field(default_factory=dict)  # added to every alert (e.g. cluster)

    @field_validator("alertmanager_urls")
    @classmethod
    def _urls(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for u in v:
            parts = urlsplit(u)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"{u!r} is not an http(s) URL")
        return v

    @field_validator("external_labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if not _LABEL_NAME_RE.match(k) or k.startswith("__")]
        if bad:
            raise ValueError(f"invalid label names: {', '.join(sorted(bad))}")
        return v

    @model_validator(mode="after")
    def _one_auth(self) -> AlertingConfig:
        if self.basic_auth is not None and self.bearer_token_file is not None:
            raise ValueError("set basic_auth or bearer_token_file, not both")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.alertmanager_urls)
