"""Scheduled sampling: providers are called by APScheduler jobs; results land as immutable snapshots in a store."""

from zmon.sampling.history import SampleHistory
from zmon.sampling.scheduler import Sampler, SourceSpec
from zmon.sampling.store import SnapshotStore, SourceKey, SourceStatus

__all__ = ["SampleHistory", "Sampler", "SnapshotStore", "SourceKey", "SourceSpec", "SourceStatus"]
