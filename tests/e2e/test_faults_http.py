"""Fault injection against the real daemon (`python -m zmon watch`, real psutil): floods, idle connections,
slowloris, bad input. The fast cases run in CI; ZMON_FAULTS_HEAVY=1 adds 1,000 concurrent scrapes and 2,000 idle
connections (or run `python -m benchmarks.faults.http_faults --heavy` for the table)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from benchmarks.faults import http_faults as faults

HEAVY = os.environ.get("ZMON_FAULTS_HEAVY") == "1"


@pytest.fixture(scope="module")
def daemon() -> Iterator[faults.Daemon]:
    # systemd's default soft limit: serving must raise it and stay inside it, the samplers keep their fds
    with faults.daemon(faults.ROOT, faults.FAST_CONFIG, soft_nofile=1024) as d:
        yield d


def _check(r: faults.Result) -> None:
    print("\n" + faults.table([r]))
    assert r.passed, faults.table([r])


def test_bad_input_is_4xx_never_500_never_a_hang(daemon: faults.Daemon) -> None:
    _check(faults.bad_input(daemon, read_timeout=faults.FAST_READ_TIMEOUT))


def test_concurrent_scrapes_are_200_or_503_and_fast(daemon: faults.Daemon) -> None:
    _check(faults.concurrent_scrapes(daemon, 1000 if HEAVY else 200))


def test_idle_connections_leave_room_for_a_scrape(daemon: faults.Daemon) -> None:
    _check(faults.idle_connections(daemon, 2000 if HEAVY else 600))


def test_slowloris_clients_are_cut_off(daemon: faults.Daemon) -> None:
    _check(faults.slowloris(daemon, 200 if HEAVY else 30, read_timeout=faults.FAST_READ_TIMEOUT))


@pytest.mark.skipif(not HEAVY, reason="heavy: ZMON_FAULTS_HEAVY=1")
def test_heavy_gzip_flood(daemon: faults.Daemon) -> None:
    _check(faults.concurrent_scrapes(daemon, 1000, gzip=True))
