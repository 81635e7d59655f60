"""Scheduled sampling: providers are called by APScheduler jobs; results land as immutable snapshots in a store."""

from zmon.sampling.scheduler import Sampler, SourceSpec
from zmon.sampling.store import SnapshotStore, SourceStatus

__all__ = ["Sampler", "SnapshotStore", "SourceSpec", "SourceStatus"]
