"""Names `zmon tune --variants` accepts, known without importing torch or diffusers.

The CLI rejects unknown `--variants` before anything heavy is imported (exit 2, listing the valid names).
The attention backend names are the configuration's (zmon.config validates `model.attention_backend`
against them). What is *runnable* on a given device is decided later, by probing (see zmon.tune.variants).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from zmon.config import ATTENTION_BACKENDS

__all__ = [
    "ATTENTION_BACKENDS",
    "ATTENTION_GROUP",
    "ATTENTION_PREFIX",
    "DEFAULT_ATTENTION_VARIANTS",
    "OPT_IN_VARIANTS",
    "VARIANT_NAMES",
    "default_variant_names",
    "parse_variants",
    "valid_variant_names",
]

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
            name.startswith(ATTENTION_PREFIX) and name[len(ATTENTION_PREFIX) :] in ATTENTION_BACKENDS
        ):
            expanded = [name]
        else:
            problems.append(f"unknown variant {name!r}")
            continue
        names.extend(n for n in expanded if n not in names)
    if not names and not problems:
        return default_variant_names(), []
    return names, problems
