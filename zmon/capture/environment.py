"""Environment probes: versions, devices, dtype, attention backend, torch.compile and allocator settings.

What the diagnosis needs to know about where a pipeline runs (the facts are zmon.analysis.facts types), and
which of NVML's GPUs is the one CUDA computes on.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from zmon.analysis.facts import EnvironmentFacts
from zmon.instrumentation import anatomy
from zmon.providers import cuda
from zmon.providers.allocator import settings_from_env
from zmon.providers.nvml import GpuSample


def nvml_index_for(torch_index: int, gpus: Sequence[GpuSample]) -> int | None:
    """The NVML index of CUDA device `torch_index` among `gpus`: by UUID, then PCI bus id, then position
    when CUDA_VISIBLE_DEVICES does not renumber, then the only GPU."""
    ident = cuda.device_identity(torch_index)
    if ident is not None:
        for g in gpus:
            if ident.uuid and g.uuid and g.uuid.lower().removeprefix("gpu-") == ident.uuid:
                return int(g.index)
        if ident.pci_bus is not None and ident.pci_device is not None:
            for g in gpus:
                parsed = _parse_pci(g.pci_bus_id)
                if (
                    parsed is not None
                    and parsed[1:] == (ident.pci_bus, ident.pci_device)
                    and (ident.pci_domain is None or parsed[0] == ident.pci_domain)
                ):
                    return int(g.index)
    if not cuda.visible_devices_renumbered() and any(g.index == torch_index for g in gpus):
        return torch_index
    return int(gpus[0].index) if len(gpus) == 1 else None


def _parse_pci(bus_id: str | None) -> tuple[int, int, int] | None:
    """'00000000:3B:00.0' → (domain, bus, device)."""
    if not bus_id:
        return None
    try:
        domain, bus, rest = bus_id.split(":")
        return int(domain, 16), int(bus, 16), int(rest.split(".")[0], 16)
    except ValueError:
        return None


def attention_backend(device: str) -> str:
    """diffusers' dispatcher backend when set, and on CUDA which SDPA kernels torch may pick."""
    parts = []
    forced = os.environ.get("DIFFUSERS_ATTN_BACKEND")
    if forced:
        parts.append(f"diffusers:{forced}")
    try:
        parts.append(f"sdpa[{','.join(cuda.sdpa_kernels())}]" if device.startswith("cuda") else "sdpa (cpu)")
    except Exception:
        parts.append("unknown")
    return " ".join(parts)


def library_version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def environment_facts(
    pipe: Any,
    *,
    model_id: str,
    distilled: bool | None = None,
    nvml_gpu: GpuSample | None = None,
    driver_version: str | None = None,
) -> EnvironmentFacts:
    """Versions, devices, dtype, attention backend, torch.compile and allocator settings of a pipeline."""
    device = anatomy.pipeline_device(pipe)
    te_device = anatomy.text_encoder_device(pipe)
    card = None
    if nvml_gpu is not None and nvml_gpu.name:
        card = nvml_gpu.name
    elif (index := cuda.device_index(device)) is not None and (ident := cuda.device_identity(index)) is not None:
        card = ident.name
    runtime = cuda.runtime_versions()
    return EnvironmentFacts(
        card_name=card,
        driver_version=driver_version,
        cuda_version=runtime["cuda"],
        torch_version=runtime["torch"],
        diffusers_version=library_version("diffusers"),
        transformers_version=library_version("transformers"),
        python_version=platform.python_version(),
        device=device,
        text_encoder_device=te_device if te_device != device else None,
        dtype=anatomy.dtype(pipe),
        attention_backend=attention_backend(device),
        compiled=anatomy.is_compiled(pipe),
        alloc_conf=settings_from_env().alloc_conf,
        model_id=model_id,
        pipeline_class=type(pipe).__name__,
        distilled=distilled,
        cpu_count=os.cpu_count(),
        offload=anatomy.offload_mode(pipe),
        weights_bytes=anatomy.weights_bytes(pipe),
    )
