"""`model.alloc_conf`: the CUDA caching allocator's settings, put into the environment before CUDA starts.

Not a pipeline transformation: torch's caching allocator reads PYTORCH_CUDA_ALLOC_CONF once, when CUDA
initialises. The CLI calls `export_alloc_conf` before anything imports torch (this module imports neither
torch nor anything that does), and `load_pipeline` calls it again as a check. Once CUDA is initialised a
different setting is refused with a clear message, never silently ignored.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from typing import Final

from zmon.providers import cuda
from zmon.workload.spec import WorkloadError

log = logging.getLogger(__name__)

ALLOC_CONF_ENV: Final = "PYTORCH_CUDA_ALLOC_CONF"
NEW_ALLOC_CONF_ENV: Final = "PYTORCH_ALLOC_CONF"  # torch >= 2.9 reads it first: it would win over ours


class ModelOptionsError(WorkloadError):
    """A `model:` speed option that cannot apply here (device, software, process state).

    A configuration problem like a workload one, so `zmon run` reports every item and exits 2.
    """


def effective_alloc_conf(environ: MutableMapping[str, str] | None = None) -> str:
    """The allocator setting torch reads: PYTORCH_ALLOC_CONF first (torch >= 2.9), else the CUDA name."""
    env = os.environ if environ is None else environ
    return env.get(NEW_ALLOC_CONF_ENV) or env.get(ALLOC_CONF_ENV) or ""


def export_alloc_conf(alloc_conf: str | None, environ: MutableMapping[str, str] | None = None) -> bool:
    """Put `model.alloc_conf` into PYTORCH_CUDA_ALLOC_CONF for torch to read when CUDA initialises.

    Returns True when the variable was (or already is) set to it, False for None. Raises ModelOptionsError
    when CUDA is already initialised with another setting (torch reads it once), or when PYTORCH_ALLOC_CONF
    holds another value (torch would read that one instead).
    """
    if alloc_conf is None:
        return False
    env = os.environ if environ is None else environ
    newer = env.get(NEW_ALLOC_CONF_ENV)
    if newer and newer != alloc_conf:
        raise ModelOptionsError(
            [
                f"model.alloc_conf: {NEW_ALLOC_CONF_ENV}={newer!r} is set in the environment and torch reads it "
                f"instead of {ALLOC_CONF_ENV}; unset it or make it {alloc_conf!r}"
            ]
        )
    if effective_alloc_conf(env) == alloc_conf:
        return True
    if cuda.initialized():
        raise ModelOptionsError(
            [
                f"model.alloc_conf: CUDA is already initialised in this process, and its caching allocator read "
                f"{ALLOC_CONF_ENV}={effective_alloc_conf(env)!r} then; start the process with "
                f"{ALLOC_CONF_ENV}={alloc_conf!r} in its environment instead"
            ]
        )
    previous = env.get(ALLOC_CONF_ENV)
    if previous:
        log.warning("model.alloc_conf overrides %s=%r with %r", ALLOC_CONF_ENV, previous, alloc_conf)
    env[ALLOC_CONF_ENV] = alloc_conf
    if environ is None:
        cuda.set_allocator_settings(alloc_conf)  # torch imported, CUDA not initialised yet: apply it now too
    return True
