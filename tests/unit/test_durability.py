"""Durability of what zmon writes: JSONL lines all or nothing (partial writes, torn tails), images whole or
not at all and every failure counted. The full-disk case is faked at the os.write boundary here; the fault
suite (benchmarks/faults/daemon_faults.py) runs it on a real full filesystem."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from zmon.instrumentation import jsonl as jsonl_module
from zmon.instrumentation.jsonl import JsonlLog
from zmon.workload.runner import Runner, Workload
from zmon.workload.spec import WorkloadSpec


def _line(i: int) -> bytes:
    return (json.dumps({"i": i, "pad": "x" * 100}) + "\n").encode()


def _lines(path: Path) -> list[dict[str, Any]]:
    raw = path.read_bytes()
    assert raw == b"" or raw.endswith(b"\n"), f"torn tail: {raw[-80:]!r}"
    return [json.loads(ln) for ln in raw.splitlines()]


class DiskFills:
    """os.write that writes only `room` more bytes in total, then fails with ENOSPC, like a filling disk."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.real = os.write

    def __call__(self, fd: int, data: bytes) -> int:
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = self.real(fd, data[: self.room])
        self.room -= n
        return n


def test_a_partial_write_is_cut_back_and_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = JsonlLog(tmp_path / "g.jsonl")
    assert log.write_line(_line(0))
    fills = DiskFills(room=len(_line(1)) + 40)  # line 1 fits, line 2 only partly, then nothing
    monkeypatch.setattr(jsonl_module.os, "write", fills)
    results = [log.write_line(_line(i)) for i in range(1, 6)]
    assert results == [True, False, False, False, False]
    assert log.failures == 4
    assert log.torn_bytes_cut == 40
    assert [r["i"] for r in _lines(tmp_path / "g.jsonl")] == [0, 1]  # all or nothing, no partial line 2
    monkeypatch.setattr(jsonl_module.os, "write", fills.real)  # space again
    assert log.write_line(_line(6))
    assert [r["i"] for r in _lines(tmp_path / "g.jsonl")] == [0, 1, 6]


def test_a_torn_tail_is_cut_at_the_next_start_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "g.jsonl"
    path.write_bytes(_line(0) + _line(1) + _line(2)[:37])  # a kill -9 in the middle of line 2
    log = JsonlLog(path)
    with caplog.at_level(logging.WARNING, "zmon.instrumentation.jsonl"):
        assert log.write_line(_line(3))
    assert [r["i"] for r in _lines(path)] == [0, 1, 3]  # never glued to the partial line
    assert log.torn_bytes_cut == 37
    assert "cut a torn last line (37 bytes)" in caplog.text


def test_a_file_of_one_torn_line_is_emptied(tmp_path: Path) -> None:
    path = tmp_path / "g.jsonl"
    path.write_bytes(b'{"i": 0, "pa' + b"\0" * 5000 + b"x" * 70_000)  # longer than one read chunk, no newline
    log = JsonlLog(path)
    assert log.write_line(_line(1))
    assert [r["i"] for r in _lines(path)] == [1]


def test_whole_files_are_left_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "g.jsonl"
    path.write_bytes(_line(0))
    with caplog.at_level(logging.WARNING):
        JsonlLog(path).write_line(_line(1))
    assert [r["i"] for r in _lines(path)] == [0, 1]
    assert "torn" not in caplog.text


def test_dev_full_counts_failures(tmp_path: Path) -> None:
    if not Path("/dev/full").exists():
        pytest.fail("/dev/full missing")
    log = JsonlLog("/dev/full")
    assert not log.write_line(_line(0))
    assert not log.write_line(_line(1))
    assert log.failures == 2


# --- images ---------------------------------------------------------------------------------------------


class Image:
    """A generated image whose save() writes half a file and then fails when the disk is 'full'."""

    full = False

    def save(self, path: Any, format: str | None = None) -> None:
        with open(path, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n" + b"x" * 100)
            if Image.full:
                raise OSError(errno.ENOSPC, "No space left on device")


class Out:
    images = (Image(), Image())


class Pipe:
    def __call__(self, **kwargs: Any) -> Out:
        return Out()


def test_image_save_failures_are_counted_and_leave_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    spec = WorkloadSpec(
        prompts=("a",),
        resolutions=((64, 64),),
        steps=1,
        guidance_scale=0.0,
        batch_size=1,
        seed=None,
        output_dir=tmp_path / "out",
    )
    runner = Runner(Workload(Pipe(), spec))
    runner.run(2)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "gen-000000-0.png",
        "gen-000000-1.png",
        "gen-000001-0.png",
        "gen-000001-1.png",
    ]
    Image.full = True
    try:
        with caplog.at_level(logging.WARNING):
            result = runner.run(3)
    finally:
        Image.full = False
    assert result.ok == 3  # the generation is not what failed
    assert runner.output_failures == 6
    assert caplog.text.count("cannot save") == 1  # once per streak
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert not [n for n in names if n.endswith(".tmp")], names  # no partial file left behind
    assert runner.images_written == 4
