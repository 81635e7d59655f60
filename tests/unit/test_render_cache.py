"""/metrics render cache: byte-identical to prometheus_client's output, re-renders only what changed."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from tests.fakes.nvml import make_mixed
from tests.fakes.psutil_fake import FakePsutil
from zmon.app.monitor import Monitor
from zmon.app.sources import add_host_sources, add_nvml_sources
from zmon.config import Config
from zmon.sampling.store import SnapshotStore
from zmon.server import RenderCache

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def build() -> tuple[Monitor, Clock, RenderCache]:
    clock = Clock()
    cfg = Config()
    mon = Monitor(
        cfg.sampling, cfg.server, mode="watch", store=SnapshotStore(clock=clock, wall=lambda: 1.7e9), serve_http=False
    )
    add_nvml_sources(mon, cfg.sampling.nvml, watched_pid=4242, nvml=make_mixed())
    add_host_sources(mon, cfg.sampling, watched_pid=4242, psutil_module=FakePsutil())
    for name in mon.sampler.sources:
        mon.sampler.run_once(name)
    return mon, clock, mon.render_cache


def test_identical_to_prometheus_client_in_both_formats() -> None:
    mon, _, cache = build()
    for accept, reference in (("", generate_latest), (OPENMETRICS, generate_openmetrics)):
        encoder, ctype = choose_encoder(accept)
        first = cache.render(encoder, ctype)
        second = cache.render(encoder, ctype)  # from the cache
        assert first == second == reference(mon.registry)
    assert generate_openmetrics(mon.registry).count(b"# EOF") == 1


def test_only_collectors_with_new_samples_are_rendered_again() -> None:
    mon, clock, cache = build()
    calls: dict[str, int] = {}
    for g in mon._collectors:
        inner = g.inner

        def counting(inner=inner, name=g.name):  # type: ignore[no-untyped-def]
            calls[name] = calls.get(name, 0) + 1
            return inner.collect()

        g.inner = type("C", (), {"collect": staticmethod(counting)})()
    encoder, ctype = choose_encoder("")
    cache.render(encoder, ctype)
    cache.render(encoder, ctype)
    assert calls["nvml"] == 1 and calls["host"] == 1
    assert calls["self"] == 2  # sample ages change on every scrape: never cached
    clock.t += 1
    mon.sampler.run_once("host")  # a new sample: re-rendered on the sampler thread (warm), not at the scrape
    assert calls["host"] == 2 and calls["nvml"] == 1
    text = cache.render(encoder, ctype)
    assert calls["host"] == 2 and calls["nvml"] == 1
    assert text == generate_latest(mon.registry)


def test_a_collector_that_failed_is_not_cached() -> None:
    mon, _, cache = build()
    host = next(g for g in mon._collectors if g.name == "host")
    real = host.inner
    host.inner = type("Broken", (), {"collect": staticmethod(lambda: 1 / 0)})()
    encoder, ctype = choose_encoder("")
    assert b"zmon_host_memory_total_bytes" not in cache.render(encoder, ctype)
    host.inner = real
    assert b"zmon_host_memory_total_bytes" in cache.render(encoder, ctype)
