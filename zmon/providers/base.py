"""The provider contract: `sample()` returns an immutable value (frozen dataclasses, tuples) or raises."""

from __future__ import annotations

import glob
from typing import Any, Protocol


class SourceUnavailable(Exception):
    """The source cannot exist on this host (no NVML library, no GPU, no CUDA): zmon runs on without it.

    `expected`: nothing is wrong (a CPU-only host has no NVML and no CUDA): zmon says so at INFO. Otherwise
    (a GPU host whose NVML library or CUDA cannot be used) it is a WARNING: something is misconfigured.
    """

    def __init__(self, reason: str, *, expected: bool = False) -> None:
        super().__init__(reason)
        self.expected = expected


def nvidia_devices_present(dev_dir: str = "/dev") -> bool:
    """True when this host (or container) exposes an NVIDIA GPU device node (/dev/nvidia0, …).

    Without one no process here can use an NVIDIA GPU, whatever NVML or torch say: their absence is expected.
    """
    return bool(glob.glob(f"{dev_dir}/nvidia[0-9]*"))


class Provider(Protocol):
    name: str

    def sample(self) -> Any:
        """Read the source once; cheap enough for its interval; raise on failure."""
        ...

    def close(self) -> None: ...
