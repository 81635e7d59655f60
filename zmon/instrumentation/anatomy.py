"""What zmon knows about a diffusers pipeline's parts: its denoisers, where it computes, whether it is compiled.

The one list of denoiser attribute names lives here; stage timing, loading (torch.compile), the profile and
the environment facts all read it.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import torch

log = logging.getLogger(__name__)

# Pipeline attributes that hold a denoiser (the module torch.compile targets; Wan-style pipelines have two).
DENOISER_NAMES: Final = ("transformer", "transformer_2", "unet")
# Modules whose forward marks the start of a denoise step: the denoisers, and a controlnet that runs first.
STEP_MODULE_NAMES: Final = ("controlnet", *DENOISER_NAMES)
COMPILED_CLASS: Final = "OptimizedModule"  # what torch.compile(module) returns


def denoisers(pipe: Any) -> list[tuple[str, Any]]:
    """(attribute, module) of every denoiser the pipeline has, compiled or not."""
    return [(name, m) for name in DENOISER_NAMES if (m := getattr(pipe, name, None)) is not None]


def denoiser(pipe: Any) -> Any:
    """The pipeline's first denoiser module, or None."""
    found = denoisers(pipe)
    return found[0][1] if found else None


def is_compiled(pipe: Any) -> bool:
    """True when a denoiser is a torch.compile wrapper."""
    return any(type(m).__name__ == COMPILED_CLASS for _, m in denoisers(pipe))


def first_parameter(module: Any) -> Any:
    try:
        return next(module.parameters(), None)
    except Exception:
        return None


def pipeline_device(pipe: Any) -> str:
    """The device the generations run on ("cuda:0", "cpu"): where the denoiser's weights live, or, for a
    pipeline that offloads its weights to the CPU between uses, where they are moved to compute."""
    if offload_mode(pipe) is not None:
        return str(execution_device(pipe))
    module = denoiser(pipe)
    param = None if module is None else first_parameter(module)
    return "cpu" if param is None else str(param.device)


def offload_mode(pipe: Any) -> str | None:
    """How the pipeline keeps its weights on the CPU between uses: "model" (enable_model_cpu_offload: a whole
    component at a time), "sequential" (enable_sequential_cpu_offload: layer by layer), "group"
    (enable_group_offload), or None."""
    try:
        if getattr(pipe, "_all_hooks", None):
            return "model"
        components = getattr(pipe, "components", {}) or {}
        modules = [c for c in components.values() if isinstance(c, torch.nn.Module)]
        if getattr(pipe, "_offload_device", None) is not None and any(hasattr(m, "_hf_hook") for m in modules):
            return "sequential"
        check = getattr(pipe, "_maybe_raise_error_if_group_offload_active", None)
        if any(hasattr(m, "_diffusers_hook") for m in modules) and callable(check) and check(raise_error=False):
            return "group"
    except Exception:
        log.debug("could not tell whether the pipeline offloads", exc_info=True)
    return None


def weights_bytes(pipe: Any) -> int | None:
    """Bytes of every component's parameters and buffers (what offloading moves), or None when there are none."""
    try:
        components = getattr(pipe, "components", {}) or {}
        total = 0
        for module in components.values():
            if isinstance(module, torch.nn.Module):
                for t in (*module.parameters(), *module.buffers()):
                    total += t.numel() * t.element_size()
    except Exception:
        log.debug("could not size the pipeline's weights", exc_info=True)
        return None
    return total or None


def execution_device(pipe: Any) -> torch.device:
    """Where the pipeline computes, cheaply (microseconds).

    diffusers' _execution_device walks every submodule looking for offload hooks, and ModelMixin.device
    scans parameters: ~1 ms each for the tiny model, more for a 6 B one. So the first parameter of each
    component decides (an accelerator wins over CPU when components are split), and diffusers is asked only
    when a component carries an offload hook (its weights then rest on the CPU between uses).
    """
    try:
        components = getattr(pipe, "components", {}) or {}
        modules = [c for c in components.values() if isinstance(c, torch.nn.Module)]
        if any(hasattr(m, "_hf_hook") or hasattr(m, "_diffusers_hook") for m in modules):
            return torch.device(pipe._execution_device)
        devices = [p.device for m in modules if (p := next(m.parameters(), None)) is not None]
    except Exception:
        log.debug("could not determine the execution device", exc_info=True)
        return torch.device("cpu")
    for device in devices:
        if device.type not in ("cpu", "meta"):
            return device
    return devices[0] if devices else torch.device("cpu")


def text_encoder_device(pipe: Any) -> str | None:
    """Where the (first) text encoder computes: where its weights live, or, offloaded, the pipeline's execution
    device; None when the pipeline has none."""
    te = getattr(pipe, "text_encoder", None)
    if te is not None and offload_mode(pipe) is not None:
        return str(execution_device(pipe))
    param = None if te is None else first_parameter(te)
    return None if param is None else str(param.device)


def dtype(pipe: Any) -> str | None:
    """The denoiser's parameter dtype ("bfloat16"), or None."""
    module = denoiser(pipe)
    param = None if module is None else first_parameter(module)
    return None if param is None else str(param.dtype).removeprefix("torch.")


def model_id(pipe: Any) -> str:
    """The pipeline's name_or_path (hub id or directory), else its class name."""
    name = getattr(pipe, "name_or_path", None)
    if not name:
        config = getattr(pipe, "config", None)
        name = config.get("_name_or_path") if isinstance(config, dict) else None
    return str(name) if name else type(pipe).__name__
