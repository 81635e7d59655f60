"""The provider contract: `sample()` returns an immutable value (frozen dataclasses, tuples) or raises."""

from __future__ import annotations

from typing import Any, Protocol


class SourceUnavailable(Exception):
    """The source cannot exist on this host (no NVML library, no GPU, no CUDA): zmon runs on without it."""


class Provider(Protocol):
    name: str

    def sample(self) -> Any:
        """Read the source once; cheap enough for its interval; raise on failure."""
        ...

    def close(self) -> None: ...
