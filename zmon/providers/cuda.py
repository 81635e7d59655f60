"""The torch.cuda boundary: every call zmon makes into `torch.cuda` (and torch's CUDA backends) is here.

Instrumentation, loading, profiling and the policy call these helpers instead of `torch.cuda` itself, so one
module shows what zmon does to the CUDA runtime: events at stage boundaries (no synchronisation inside a
generation), peak-memory statistics, NVTX ranges, device identity, allocator history for memory snapshots,
`empty_cache`. torch is imported lazily (on first use): `zmon watch` never imports it.

Tests inject a fake `torch.cuda` where a function takes `torch_cuda` (tests/fakes/cuda_allocator.py).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zmon.providers.base import SourceUnavailable

HISTORY_STACKS = "python"  # C++ frames take minutes to symbolise at dump time for a large model


def load_torch_cuda(torch_cuda: Any | None = None) -> Any:
    """Return `torch.cuda` (imported here, lazily) or the injected fake; raise SourceUnavailable if absent."""
    if torch_cuda is not None:
        return torch_cuda
    try:
        import torch
    except Exception as e:  # ImportError, or a broken CUDA install raising at import
        raise SourceUnavailable(f"torch is not importable: {e}", expected=isinstance(e, ImportError)) from None
    return torch.cuda


def is_available() -> bool:
    """True when torch is importable and sees a CUDA device (creates no context)."""
    try:
        return bool(load_torch_cuda().is_available())
    except (SourceUnavailable, RuntimeError):
        return False


def cuda_ready(torch_cuda: Any) -> bool:
    """True when CUDA is available and already initialised in this process (no context is created)."""
    if not torch_cuda.is_available():
        return False
    is_init = getattr(torch_cuda, "is_initialized", None)
    return bool(is_init()) if is_init is not None else True


def initialized() -> bool:
    """True when this process has initialised CUDA. Never imports torch: without it, nothing was initialised.

    Used before CUDA starts (model.alloc_conf is read once, at initialisation), so it must not be what
    imports torch or creates a context.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        return bool(torch.cuda.is_initialized())
    except Exception:
        return False


def set_allocator_settings(conf: str) -> bool:
    """Hand PYTORCH_CUDA_ALLOC_CONF-style settings to an imported torch whose CUDA is not initialised yet.

    Where a torch parses its allocator configuration before initialisation, the environment alone would come
    too late; the runtime setter (torch.cuda.memory._set_allocator_settings) applies it. Returns whether it
    was called; never imports torch and never raises.
    """
    torch = sys.modules.get("torch")
    setter = getattr(getattr(getattr(torch, "cuda", None), "memory", None), "_set_allocator_settings", None)
    if setter is None:
        return False
    try:
        if not torch.cuda.is_available():  # type: ignore[union-attr]
            return False
        setter(conf)
    except Exception:
        return False
    return True


def capability(device: Any) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device (e.g. (9, 0) for an H100/H200)."""
    major, minor = load_torch_cuda().get_device_capability(device)
    return int(major), int(minor)


def device_name(device: Any) -> str:
    """The CUDA device's product name (e.g. "NVIDIA H200")."""
    return str(load_torch_cuda().get_device_name(device))


def synchronize(device: Any = None) -> None:
    """Wait for every kernel queued on `device` (outside generations only: it stalls the pipeline)."""
    load_torch_cuda().synchronize(device)


def current_device() -> int:
    return int(load_torch_cuda().current_device())


def device_count() -> int:
    """CUDA devices visible to this process (0 without CUDA); creates no context."""
    try:
        cuda = load_torch_cuda()
        return int(cuda.device_count()) if cuda.is_available() else 0
    except (SourceUnavailable, RuntimeError):
        return 0


def set_device(index: int) -> None:
    """Make `index` this process's current CUDA device, before anything touches CUDA: a worker that owns one
    GPU then creates no context on device 0 (torch's default), and calls without a device mean its own."""
    load_torch_cuda().set_device(index)


def device_index(device: str) -> int | None:
    """'cuda:1' → 1, 'cuda' → the current CUDA device, anything else (cpu, mps) → None."""
    if not device.startswith("cuda"):
        return None
    _, _, idx = device.partition(":")
    if idx:
        return int(idx)
    try:
        return current_device()
    except Exception:
        return 0


# ------------------------------------------------------------------------------------------------ memory


def reserved_bytes(torch_cuda: Any, devices: Sequence[int]) -> int:
    """Bytes reserved by the caching allocator, summed over `devices`."""
    return sum(int(torch_cuda.memory_reserved(d)) for d in devices)


def empty_cache(torch_cuda: Any) -> None:
    """Release the allocator's unused cached blocks on every device (synchronises; call at safe points)."""
    torch_cuda.empty_cache()


def reset_peak_memory(device: Any) -> None:
    """Start a new peak for max_memory_allocated/reserved (no synchronisation)."""
    load_torch_cuda().reset_peak_memory_stats(device)


def peak_memory(device: Any) -> tuple[int, int]:
    """(peak allocated, peak reserved) bytes since the last reset (no synchronisation)."""
    cuda = load_torch_cuda()
    return int(cuda.max_memory_allocated(device)), int(cuda.max_memory_reserved(device))


class MemoryHistory:
    """The allocator's recorded history, dumped as a snapshot for https://pytorch.org/memory_viz.

    Recording keeps a Python stack per allocation (CPU time on every allocation): start it only where a
    snapshot is wanted. Used by `zmon profile --memory-snapshot` and by the runner's OOM snapshots.
    """

    def __init__(self, torch_cuda: Any | None = None) -> None:
        self._injected = torch_cuda
        self.recording = False

    def _cuda(self) -> Any:
        return load_torch_cuda(self._injected)

    def start(self, max_entries: int) -> None:
        """Start recording; raises SourceUnavailable without CUDA, RuntimeError/AttributeError from torch."""
        cuda = self._cuda()
        if not cuda_ready(cuda) and not cuda.is_available():
            raise SourceUnavailable("CUDA is not available: no allocator history to record")
        cuda.memory._record_memory_history(max_entries=max_entries, stacks=HISTORY_STACKS)
        self.recording = True

    def dump(self, path: Path) -> Path:
        self._cuda().memory._dump_snapshot(str(path))
        return path

    def stop(self) -> None:
        """Stop recording and free the history; idempotent."""
        if self.recording:
            self.recording = False
            self._cuda().memory._record_memory_history(enabled=None)


# ------------------------------------------------------------------------------------------------ timing


class EventTimeline:
    """CUDA events recorded on one stream at stage boundaries, read once after the generation.

    `mark()` records an event and returns nothing to wait for; `offsets()` synchronises on the last event
    only (the generation has returned by then) and gives seconds from the first mark.
    """

    def __init__(self, device: Any) -> None:
        cuda = load_torch_cuda()
        self._cuda = cuda
        self._stream = cuda.current_stream(device)
        self._events: list[Any] = []

    def mark(self) -> None:
        event = self._cuda.Event(enable_timing=True)
        event.record(self._stream)
        self._events.append(event)

    def __len__(self) -> int:
        return len(self._events)

    def offsets(self) -> list[float]:
        """Seconds from the first mark to each mark; raises RuntimeError (e.g. a sticky CUDA error)."""
        self._events[-1].synchronize()
        first = self._events[0]
        return [first.elapsed_time(e) / 1000.0 for e in self._events]


def nvtx_start(name: str) -> int:
    """Open an NVTX range (Nsight Systems shows it); returns the id for nvtx_end."""
    return int(load_torch_cuda().nvtx.range_start(name))


def nvtx_end(range_id: int) -> None:
    load_torch_cuda().nvtx.range_end(range_id)


# ------------------------------------------------------------------------------------------------ identity


@dataclass(frozen=True)
class DeviceIdentity:
    """What CUDA says about one device, to find it among NVML's GPUs (which ignore CUDA_VISIBLE_DEVICES)."""

    index: int
    name: str | None
    uuid: str | None  # without the "GPU-" prefix, lower case
    pci_domain: int | None
    pci_bus: int | None
    pci_device: int | None
    total_memory_bytes: int | None


def device_identity(index: int) -> DeviceIdentity | None:
    """The identity of CUDA device `index`, or None when CUDA cannot tell."""
    try:
        props = load_torch_cuda().get_device_properties(index)
    except Exception:
        return None

    def opt_int(name: str) -> int | None:
        v = getattr(props, name, None)
        return None if v is None else int(v)

    uuid = str(getattr(props, "uuid", "") or "").lower().removeprefix("gpu-") or None
    return DeviceIdentity(
        index=index,
        name=getattr(props, "name", None),
        uuid=uuid,
        pci_domain=opt_int("pci_domain_id"),
        pci_bus=opt_int("pci_bus_id"),
        pci_device=opt_int("pci_device_id"),
        total_memory_bytes=opt_int("total_memory"),
    )


def visible_devices_renumbered() -> bool:
    """True when CUDA_VISIBLE_DEVICES is set, so CUDA indices may differ from NVML's."""
    return bool(os.environ.get("CUDA_VISIBLE_DEVICES"))


def runtime_versions() -> dict[str, str | None]:
    """torch and the CUDA runtime it was built with."""
    try:
        import torch
    except Exception:
        return {"torch": None, "cuda": None}
    return {"torch": str(torch.__version__), "cuda": torch.version.cuda}


def sdpa_kernels() -> list[str]:
    """Which scaled-dot-product-attention kernels torch may pick on CUDA."""
    import torch

    b = torch.backends.cuda
    return [
        name
        for name, on in (
            ("flash", b.flash_sdp_enabled()),
            ("mem_efficient", b.mem_efficient_sdp_enabled()),
            ("cudnn", getattr(b, "cudnn_sdp_enabled", lambda: False)()),
            ("math", b.math_sdp_enabled()),
        )
        if on
    ]
