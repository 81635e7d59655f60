"""A deterministic stand-in for the psutil calls zmon.providers.host makes; `tick()` advances every counter.

The values are chosen to be exact in binary floating point so golden exposition files stay stable. Per tick
(one "second"): core 0 is 75% busy (user 0.5 of which guest 0.25, system 0.25, idle 0.25), core 1 is 25% busy
(user 0.25, iowait 0.25, idle 0.5), so the whole host is 50% busy. The watched process can vanish, reappear
under the same pid (pid reuse, with a new create_time), turn zombie, or deny single fields.
"""

from __future__ import annotations

import contextlib
from collections import namedtuple
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple


# Same field names and order as psutil's on Linux.
class scputimes(NamedTuple):
    user: float = 0.0
    nice: float = 0.0
    system: float = 0.0
    idle: float = 0.0
    iowait: float = 0.0
    irq: float = 0.0
    softirq: float = 0.0
    steal: float = 0.0
    guest: float = 0.0
    guest_nice: float = 0.0


svmem = namedtuple("svmem", "total available percent used free")
sswap = namedtuple("sswap", "total used free percent sin sout")
sdiskio = namedtuple(
    "sdiskio",
    "read_count write_count read_bytes write_bytes read_time write_time read_merged_count write_merged_count busy_time",
)
sdiskio_bsd = namedtuple("sdiskio_bsd", "read_count write_count read_bytes write_bytes read_time write_time")
sdiskusage = namedtuple("sdiskusage", "total used free percent")
snetio = namedtuple("snetio", "bytes_sent bytes_recv packets_sent packets_recv errin errout dropin dropout")
pcputimes = namedtuple("pcputimes", "user system children_user children_system iowait")
pmem = namedtuple("pmem", "rss vms shared text lib data dirty")
popenfile = namedtuple("popenfile", "path fd position mode flags")

STATUS_RUNNING = "running"
STATUS_SLEEPING = "sleeping"
STATUS_ZOMBIE = "zombie"

WATCHED_PID = 4242
GiB = 1 << 30


class Error(Exception):
    pass


class NoSuchProcess(Error):
    def __init__(self, pid: int, name: str | None = None, msg: str | None = None) -> None:
        super().__init__(msg or f"process no longer exists (pid={pid})")
        self.pid = pid
        self.name = name


class ZombieProcess(NoSuchProcess):
    pass


class AccessDenied(Error):
    def __init__(self, pid: int | None = None, name: str | None = None) -> None:
        super().__init__(f"access denied (pid={pid})")
        self.pid = pid
        self.name = name


@dataclass
class FakeProc:
    """What the kernel knows about one process; cumulative fields grow with `FakePsutil.tick`."""

    name: str
    create_time: float
    user: float = 12.5
    system: float = 2.25
    rss: int = 3 * GiB
    vms: int = 40 * GiB
    threads: int = 24
    fds: int = 57
    files: tuple[str, ...] = ("/models/z-image/transformer.safetensors", "/var/log/zmon-service.log")
    status: str = STATUS_SLEEPING
    denied: frozenset[str] = frozenset()  # method names that raise AccessDenied


@dataclass
class FakePsutil:
    """Module-shaped fake: pass it as `psutil_module=` to the providers."""

    ticks: int = 0
    procs: dict[int, FakeProc] = field(
        default_factory=lambda: {WATCHED_PID: FakeProc("python3", create_time=1_767_225_600.5)}
    )
    filesystems: dict[str, sdiskusage] = field(
        default_factory=lambda: {
            "/": sdiskusage(total=512 * GiB, used=128 * GiB, free=358 * GiB, percent=25.0),
            "/models": sdiskusage(total=2048 * GiB, used=1536 * GiB, free=512 * GiB, percent=75.0),
        }
    )

    NoSuchProcess = NoSuchProcess
    ZombieProcess = ZombieProcess
    AccessDenied = AccessDenied
    Error = Error
    STATUS_ZOMBIE = STATUS_ZOMBIE

    # ---- test controls

    def tick(self, n: int = 1) -> None:
        """Advance every cumulative counter by n steps."""
        self.ticks += n
        for p in self.procs.values():
            p.user += 0.75 * n
            p.system += 0.125 * n

    def vanish(self, pid: int = WATCHED_PID) -> None:
        del self.procs[pid]

    def spawn(self, pid: int = WATCHED_PID, name: str = "python3", create_time: float = 1_767_229_200.0) -> None:
        self.procs[pid] = FakeProc(name, create_time=create_time, user=0.5, system=0.25)

    # ---- CPU and memory

    def cpu_times(self, percpu: bool = False) -> Any:
        t = self.ticks
        cores = [
            scputimes(user=100.0 + 0.5 * t, system=20.0 + 0.25 * t, idle=880.0 + 0.25 * t, guest=4.0 + 0.25 * t),
            scputimes(user=50.0 + 0.25 * t, idle=940.0 + 0.5 * t, iowait=10.0 + 0.25 * t, irq=0.5),
        ]
        if percpu:
            return cores
        return scputimes(*(sum(values) for values in zip(*cores, strict=True)))

    def cpu_count(self, logical: bool = True) -> int:
        return 2

    def getloadavg(self) -> tuple[float, float, float]:
        return (1.5, 0.75, 0.25)

    def virtual_memory(self) -> svmem:
        return svmem(total=64 * GiB, available=48 * GiB, percent=25.0, used=16 * GiB, free=40 * GiB)

    def swap_memory(self) -> sswap:
        return sswap(total=8 * GiB, used=1 * GiB, free=7 * GiB, percent=12.5, sin=0, sout=0)

    # ---- disks and network

    def disk_io_counters(self, perdisk: bool = False, nowrap: bool = True) -> dict[str, Any]:
        assert perdisk, "zmon reads per-disk counters only"
        t = self.ticks
        return {
            "loop0": sdiskio(10, 0, 40960, 0, 1, 0, 0, 0, 1),
            "nvme0n1": sdiskio(
                read_count=1000 + 100 * t,
                write_count=500 + 10 * t,
                read_bytes=GiB + 64 * (1 << 20) * t,
                write_bytes=256 * (1 << 20) + (1 << 20) * t,
                read_time=4000,
                write_time=2000,
                read_merged_count=0,
                write_merged_count=0,
                busy_time=3500 + 250 * t,
            ),
            "ram0": sdiskio(0, 0, 0, 0, 0, 0, 0, 0, 0),
            # Shaped like psutil's counters on macOS/BSD: no busy_time.
            "sdb": sdiskio_bsd(20, 30, 81920, 122880, 5, 7),
        }

    def disk_usage(self, path: str) -> sdiskusage:
        try:
            return self.filesystems[path]
        except KeyError:
            raise FileNotFoundError(2, "No such file or directory", path) from None

    def net_io_counters(self, pernic: bool = False, nowrap: bool = True) -> dict[str, snetio]:
        assert pernic, "zmon reads per-interface counters only"
        t = self.ticks
        return {
            "br-5f2a9c": snetio(1, 2, 3, 4, 0, 0, 0, 0),
            "docker0": snetio(5, 6, 7, 8, 0, 0, 0, 0),
            "eth0": snetio(
                bytes_sent=2_000_000 + 1000 * t,
                bytes_recv=9_000_000 + 50_000 * t,
                packets_sent=15_000 + 10 * t,
                packets_recv=60_000 + 40 * t,
                errin=3,
                errout=0,
                dropin=12 + t,
                dropout=1,
            ),
            "ib0": snetio(10**9, 2 * 10**9, 10**6, 2 * 10**6, 0, 0, 0, 0),
            "lo": snetio(123, 123, 4, 4, 0, 0, 0, 0),
            "veth1a2b3c": snetio(9, 9, 1, 1, 0, 0, 0, 0),
        }

    # ---- processes

    def Process(self, pid: int) -> FakeProcess:  # named like psutil.Process
        return FakeProcess(self, pid)


class FakeProcess:
    """psutil.Process over a FakePsutil: bound to the pid and the create_time it had when made."""

    def __init__(self, fake: FakePsutil, pid: int) -> None:
        self._fake = fake
        self.pid = pid
        self._create_time = self._proc().create_time

    def _proc(self, method: str = "") -> FakeProc:
        p = self._fake.procs.get(self.pid)
        # A pid now held by another process counts as gone for this object, as psutil's does.
        if p is None or (hasattr(self, "_create_time") and p.create_time != self._create_time):
            raise NoSuchProcess(self.pid)
        if method in p.denied:
            raise AccessDenied(self.pid, p.name)
        if p.status == STATUS_ZOMBIE and method in {"num_fds", "open_files"}:
            raise ZombieProcess(self.pid, p.name)
        return p

    @contextlib.contextmanager
    def oneshot(self) -> Iterator[None]:
        yield

    def status(self) -> str:
        return self._proc("status").status

    def name(self) -> str:
        return self._proc("name").name

    def create_time(self) -> float:
        return self._proc("create_time").create_time

    def cpu_times(self) -> pcputimes:
        p = self._proc("cpu_times")
        return pcputimes(p.user, p.system, 0.0, 0.0, 0.0)

    def memory_info(self) -> pmem:
        p = self._proc("memory_info")
        return pmem(p.rss, p.vms, 0, 0, 0, 0, 0)

    def num_threads(self) -> int:
        return self._proc("num_threads").threads

    def num_fds(self) -> int:
        return self._proc("num_fds").fds

    def open_files(self) -> list[popenfile]:
        p = self._proc("open_files")
        return [popenfile(path, 3 + i, 0, "r", 0) for i, path in enumerate(p.files)]
