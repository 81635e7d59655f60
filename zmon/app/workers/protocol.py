"""What a worker process and its supervisor say to each other: the worker's assignment and the messages.

One worker per device (`model.devices`), started with multiprocessing's spawn method. The supervisor
(zmon.app.workers.supervisor) passes each worker a `WorkerSpec`; the worker (zmon.app.workers.worker) sends
`Ready` once its pipeline is loaded, `Busy` around each pipeline call, a `Record` per generation, an `Item`
per workload item finished, `Allocator` and `Stats` snapshots, and `Done` (or `Fatal`) at the end. Messages are frozen
dataclasses sent over a multiprocessing Pipe, pickled. The supervisor sends `Command`s back (queued remedial
actions from POST /actions) and `Stop` (the drain): a pipe message, not a shared multiprocessing.Event,
because a worker killed while waiting on such an event leaves its condition's sleeper count behind, and the
parent's next set() then blocks for ever.

Every process zmon starts gets `MULTICAST_OFF` in its environment: NVLink multicast (NVLS, NVSHMEM multicast,
torch symmetric-memory multicast) is left off, because on shared multi-GPU hosts a program that uses it can
put the host's GPUs out of service for everyone (for a day or more on the hosts this was written on), and
nothing zmon runs needs it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from zmon.analysis.facts import EnvironmentFacts
from zmon.collectors.generation import PipelineFacts
from zmon.config import Config
from zmon.instrumentation.records import GenerationRecord
from zmon.providers.allocator import AllocatorSample

MULTICAST_OFF: Final[Mapping[str, str]] = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


@dataclass(frozen=True)
class Placement:
    """Where one worker runs: `label` is its `device` label on metrics, `device` what its pipeline is moved to."""

    label: str  # "cuda:1", "cpu:0"
    device: str  # "cuda:1", "cpu"
    cuda_index: int | None = None


@dataclass(frozen=True)
class WorkerSpec:
    """One worker's assignment: the items i ≡ index (mod workers) from `start`, below `limit` (None: forever).

    Round-robin by item index keeps every item's prompt, resolution and seed what a single process would give
    it (a profile's warm-up is then the first `warmup × workers` items: each worker's first `warmup`).
    """

    index: int
    workers: int
    placement: Placement
    config: Config
    start: int
    limit: int | None = None
    incarnation: int = 0

    def items(self) -> Iterator[int]:
        i = self.start
        while self.limit is None or i < self.limit:
            yield i
            i += self.workers


# ------------------------------------------------------------------------------------------------ messages


@dataclass(frozen=True)
class Ready:
    """The worker loaded its pipeline and starts generating."""

    pid: int
    pipeline: PipelineFacts
    environment: EnvironmentFacts | None
    load_seconds: float
    checkpoint_bytes: int | None
    distilled: bool


@dataclass(frozen=True)
class Record:
    """One pipeline call's record (`item`: the workload item it was for)."""

    item: int
    record: GenerationRecord


@dataclass(frozen=True)
class Busy:
    """A pipeline call started (True) or ended (False): the parent's zmon_generation_in_progress."""

    busy: bool


@dataclass(frozen=True)
class Item:
    """A workload item is finished (after its out-of-memory retry, if any)."""

    item: int
    status: Literal["ok", "oom", "error"]


@dataclass(frozen=True)
class Allocator:
    """The worker's latest caching-allocator sample (its own device)."""

    sample: AllocatorSample


@dataclass(frozen=True)
class Stats:
    """Counters that live in the worker: the policy's state and the prompt cache's (None where off)."""

    policy: Any = None  # zmon.policy.actions.PolicySnapshot
    alerts: Any = None  # zmon.alerting.alertmanager.DeliveryStats
    prompt_cache: tuple[int, int, int, int] | None = None  # hits, misses, evictions, entries


@dataclass(frozen=True)
class Done:
    """The worker's share is finished or it was asked to stop; `broken_setup`: every first generation failed."""

    generations: int
    ok: int
    stopped_early: bool
    broken_setup: bool


@dataclass(frozen=True)
class Fatal:
    """The worker cannot run at all (bad workload, cannot load the model): restarting would not help."""

    problems: tuple[str, ...]
    usage: bool  # a configuration / workload problem (exit 2), not a runtime failure


@dataclass(frozen=True)
class Command:
    """From the supervisor: a remedial action to queue for the next safe point."""

    action: str
    reason: str = "requested over HTTP"


@dataclass(frozen=True)
class Stop:
    """From the supervisor: finish the current generation and exit (the drain)."""


Message = Ready | Record | Busy | Item | Allocator | Stats | Done | Fatal
