"""Names `zmon tune` and the `model:` options accept, known without importing torch or diffusers.

config.py validates `model.attention_backend` / `model.compile_mode` / `model.alloc_conf` against these, and
the CLI rejects unknown `--variants` before anything heavy is imported (exit 2, listing the valid names).
What is *runnable* on a given device is decided later, by probing (see zmon.tune.variants).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

# diffusers' attention dispatcher backends (diffusers.models.attention_dispatch.AttentionBackendName,
# 0.36–0.42). A name the installed diffusers lacks is reported when it is applied, not here.
ATTENTION_BACKENDS: Final[tuple[str, ...]] = (
    "native",
    "_native_cudnn",
    "_native_efficient",
    "_native_flash",
    "_native_math",
    "_native_npu",
    "_native_xla",
    "flex",
    "flash",
    "flash_varlen",
    "flash_hub",
    "flash_varlen_hub",
    "flash_4_hub",
    "_flash_3",
    "_flash_varlen_3",
    "_flash_3_hub",
    "_flash_3_varlen_hub",
    "aiter_fa2_hub",
    "sage",
    "sage_hub",
    "sage_blackwell_hub",
    "sage_varlen",
    "_sage_qk_int8_pv_fp8_cuda",
    "_sage_qk_int8_pv_fp8_cuda_sm90",
    "_sage_qk_int8_pv_fp16_cuda",
    "_sage_qk_int8_pv_fp16_triton",
    "xformers",
)
# Backends `zmon tune` tries when asked for the "attention" group: torch's own kernels (no extra package,
# no download). Others are tried when named explicitly (attention:sage, ...) and skipped with the reason
# when their package is missing. NPU/XLA backends need devices zmon does not drive.
DEFAULT_ATTENTION_VARIANTS: Final[tuple[str, ...]] = (
    "native",
    "_native_cudnn",
    "_native_flash",
    "_native_efficient",
    "_native_math",
    "flex",
)

# torch.compile modes (None = "default"). reduce-overhead and max-autotune capture CUDA graphs.
COMPILE_MODES: Final[tuple[str, ...]] = (
    "default",
    "reduce-overhead",
    "max-autotune",
    "max-autotune-no-cudagraphs",
)

ATTENTION_PREFIX: Final = "attention:"
# Every variant name `zmon tune --variants` accepts, besides "attention:<backend>" and the group "attention".
VARIANT_NAMES: Final[tuple[str, ...]] = (
    "compile",
    "compile_vae",
    "cuda_graphs",
    "compile_max_autotune",
    "prompt_cache",
    "channels_last",
    "fp8",
    "expandable_segments",
    "fewer_steps",
)
# Named but not run unless asked for: max-autotune compiles for many minutes on a 6 B-parameter model.
OPT_IN_VARIANTS: Final[frozenset[str]] = frozenset({"compile_max_autotune"})
ATTENTION_GROUP: Final = "attention"


def default_variant_names() -> list[str]:
    """What `zmon tune` tries when --variants is not given: every variant but the opt-in ones."""
    names = [n for n in VARIANT_NAMES if n not in OPT_IN_VARIANTS]
    return names + [ATTENTION_PREFIX + b for b in DEFAULT_ATTENTION_VARIANTS]


def valid_variant_names() -> list[str]:
    return [*VARIANT_NAMES, ATTENTION_GROUP, *(ATTENTION_PREFIX + b for b in ATTENTION_BACKENDS)]


def parse_variants(text: str | Iterable[str] | None) -> tuple[list[str], list[str]]:
    """'compile,attention,prompt_cache' → (names in order, problems). The group "attention" expands to the
    default attention backends; duplicates are dropped; None or empty → the default list."""
    if text is None:
        return default_variant_names(), []
    items = text.split(",") if isinstance(text, str) else list(text)
    names: list[str] = []
    problems: list[str] = []
    for raw in items:
        name = raw.strip()
        if not name:
            continue
        if name == ATTENTION_GROUP:
            expanded = [ATTENTION_PREFIX + b for b in DEFAULT_ATTENTION_VARIANTS]
        elif name in VARIANT_NAMES or (
            name.startswith(ATTENTION_PREFIX) and name[len(ATTENTION_PREFIX):] in ATTENTION_BACKENDS
        ):
            expanded = [name]
        else:
            problems.append(f"unknown variant {name!r}")
            continue
        names.extend(n for n in expanded if n not in names)
    if not names and not problems:
        return default_variant_names(), []
    return names, problems


def alloc_conf_problem(value: str) -> str | None:
    """Why a PYTORCH_CUDA_ALLOC_CONF string is unusable, or None. Items are 'key:value' separated by commas.

    expandable_segments together with max_split_size_mb is refused: the maintainers advise against the
    combination (splitting limits are meaningless for expandable segments).
    """
    items = [i.strip() for i in value.split(",") if i.strip()]
    if not items:
        return "empty; use null for the default allocator"
    keys: dict[str, str] = {}
    for item in items:
        key, sep, val = item.partition(":")
        if not sep or not key.strip() or not val.strip():
            return f"{item!r} is not key:value (e.g. expandable_segments:True)"
        keys[key.strip()] = val.strip()
    if keys.get("expandable_segments", "").lower() in ("true", "1") and "max_split_size_mb" in keys:
        return "expandable_segments and max_split_size_mb must not be combined"
    return None
