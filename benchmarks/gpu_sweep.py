"""GPU: the allocator under a resolution sweep, zmon's policy acting on it, a memory cap, expandable segments.

On the full-size random-weight Z-Image (benchmarks.fullsize, bf16, ~20 GB of weights), each generation of the
sweep 512→1024→768→1280→640→1152→896→1536→704→1024 (square, 9 steps, guidance 0) is bracketed by a real
PolicyRunner's generation_started()/generation_finished(). After each pipeline call, still inside the bracket,
the allocator is sampled (zmon.providers.allocator.AllocatorProvider) and fed to the policy, so a rule that
fires queues its action for the safe point, which generation_finished() then runs; a second sample after it
shows what the action did (zmon run's sampler would see that one between generations).

Policy rules: zmon's defaults, except reserved_unallocated_high with for_samples=1 and cooldown_seconds=0 (the
defaults, 3 samples and 300 s, cannot fire more than once in a 10-generation sweep; here it acts after every
generation that ends above 0.30). "off" runs use the same runner in dry_run: decisions are recorded, nothing runs.
"on" runs also recover from OOM as `zmon run` does (zmon.workload.oom.OomHandler: empty_cache, one retry).

Phases, per allocator setting, each in a fresh process (PYTORCH_CUDA_ALLOC_CONF is read once, when CUDA
initialises; the orchestrator re-invokes this script with --child default, then --child expandable):
  warmup     one 512² generation, then one 1536² from an emptied cache: the largest shape's own peaks
  observe    the sweep, policy off: how (reserved − allocated)/reserved and inactive_split/reserved climb
  policy     the sweep, policy on: actions, bytes freed, empty_cache latency, generation latency
  capped     set_per_process_memory_fraction(peak_reserved(1536) × 1.02 / total), the sweep off then on:
             OOMs, num_alloc_retries, p50/p95; if "off" shows neither retries nor OOMs the cap is tightened to
             halfway between the 1536² peak allocated and peak reserved and both run again
  oom        a cap just above the weights, one 1536² generation with zmon.workload.oom recording the allocator
             history: OOM, snapshot dumped (size reported, file deleted), empty_cache, retry, OOM again
Every process writes OUT/sweep-<mode>.json after each phase (a timeout keeps what was measured); the
orchestrator writes OUT/gpu_sweep.json and prints the tables. Phases that would overrun the deadline are skipped.

Run (repo root, PYTHONPATH=.): python -m benchmarks.gpu_sweep --out DIR    (~4-6 min on one H100/H200; needs
diffusers, transformers, pydantic, prometheus_client, apscheduler, psutil like benchmarks.gpu_profile)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SWEEP: tuple[int, ...] = (512, 1024, 768, 1280, 640, 1152, 896, 1536, 704, 1024)
STEPS = 9
PROMPT = "a lighthouse on a rocky coast at dusk, volumetric light, detailed, photographic"
MODES: dict[str, str | None] = {"default": None, "expandable": "expandable_segments:True"}
ALLOC_CONF_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
TOTAL_BUDGET_S = 450.0  # the lead's limit is 8 min; leave room for start-up and the final table
GIB = 1024**3


# ---------------------------------------------------------------------------------------------- records


@dataclass
class Mem:
    """One allocator reading of device 0 (bytes; ratios 0..1, None when nothing is reserved)."""

    allocated: int
    reserved: int
    inactive_split: int | None
    reserved_unallocated_ratio: float | None
    fragmentation_ratio: float | None
    headroom: int | None
    alloc_retries: int | None
    ooms: int | None


@dataclass
class Gen:
    """One generation of a sweep (a retry after OOM is part of the same generation)."""

    index: int
    size: int
    status: str  # ok, oom, error
    seconds: float  # wall time of the pipeline call(s), retry included
    attempts: int
    oom_attempts: int
    peak_allocated: int
    peak_reserved: int
    before: Mem  # at the end of the call, before the safe point
    after: Mem  # after the safe point's actions
    decisions: list[str] = field(default_factory=list)  # "rule:event"
    actions: list[dict[str, Any]] = field(default_factory=list)  # action, result, freed_bytes, seconds, reason
    error: str = ""


def action(r: Any) -> dict[str, Any]:
    return {
        "action": r.action,
        "result": r.result,
        "freed_bytes": r.freed_bytes,
        "seconds": r.seconds,
        "reason": r.reason,
    }


def recording_remediator(dry_run: bool) -> Any:
    """A Remediator that also keeps every ActionResult (rule actions, OOM recovery) in `.log`."""
    from zmon.policy import ActionResult, Remediator

    class Recording(Remediator):
        def __init__(self) -> None:
            super().__init__(dry_run=dry_run)
            self.log: list[ActionResult] = []

        def run(self, action: str, *, reason: str = "") -> ActionResult:
            r = super().run(action, reason=reason)
            self.log.append(r)
            return r

    return Recording()


def mem(sample: Any) -> Mem:
    d = sample.devices[0]
    return Mem(
        d.allocated_bytes,
        d.reserved_bytes,
        d.inactive_split_bytes,
        d.reserved_unallocated_ratio,
        d.fragmentation_ratio,
        d.headroom_bytes,
        d.alloc_retries,
        d.ooms,
    )


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def summarize(gens: list[Gen]) -> dict[str, Any]:
    ok = [g.seconds for g in gens if g.status == "ok"]
    ec = [a for g in gens for a in g.actions if a["action"] == "empty_cache" and a["result"] == "ok"]
    ratios = [g.before.reserved_unallocated_ratio for g in gens if g.before.reserved_unallocated_ratio is not None]
    frags = [g.before.fragmentation_ratio for g in gens if g.before.fragmentation_ratio is not None]
    return {
        "generations": len(gens),
        "ok": sum(g.status == "ok" for g in gens),
        "oom": sum(g.status == "oom" for g in gens),
        "oom_attempts": sum(g.oom_attempts for g in gens),
        "errors": sum(g.status == "error" for g in gens),
        "p50_s": percentile(ok, 50),
        "p95_s": percentile(ok, 95),
        "total_s": sum(g.seconds for g in gens),
        "max_reserved_unallocated_ratio": max(ratios, default=None),
        "last_reserved_unallocated_ratio": gens[-1].after.reserved_unallocated_ratio,
        "max_fragmentation_ratio": max(frags, default=None),
        "max_peak_reserved": max(g.peak_reserved for g in gens),
        "max_peak_allocated": max(g.peak_allocated for g in gens),
        "empty_cache_calls": len(ec),
        "empty_cache_ms_median": statistics.median(a["seconds"] for a in ec) * 1e3 if ec else None,
        "empty_cache_ms_max": max(a["seconds"] for a in ec) * 1e3 if ec else None,
        "freed_bytes": sum(a["freed_bytes"] or 0 for a in ec),
    }


# ---------------------------------------------------------------------------------------------- the child


class Child:
    """One process, one allocator setting: builds the model once and runs the phases."""

    def __init__(self, mode: str, out: Path, deadline: float) -> None:
        import torch

        from benchmarks.fullsize import build_full_z_image
        from zmon.providers.allocator import AllocatorProvider

        self.torch = torch
        self.mode = mode
        self.out = out
        self.deadline = deadline
        self.provider = AllocatorProvider()
        self.result: dict[str, Any] = {
            "mode": mode,
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
            "card": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "phases": {},
            "skipped": [],
            "sweep": SWEEP,
            "steps": STEPS,
            "guidance_scale": 0.0,
            "policy_rules": "zmon defaults; reserved_unallocated_high with for_samples=1, cooldown_seconds=0",
        }
        t0 = time.perf_counter()
        self.pipe = build_full_z_image()
        torch.cuda.synchronize()
        self.result["build_seconds"] = time.perf_counter() - t0
        self.total = int(torch.cuda.mem_get_info(0)[1])
        self.weights = int(torch.cuda.memory_allocated(0))
        self.result.update(
            total_bytes=self.total, weights_bytes=self.weights, settings=asdict(self.provider.settings())
        )
        self.sweep_walls: list[float] = []
        self.save()

    # -- helpers ----------------------------------------------------------------------------------------

    def save(self) -> None:
        (self.out / f"sweep-{self.mode}.json").write_text(json.dumps(self.result, indent=1, default=str) + "\n")

    @property
    def sweep_estimate(self) -> float:
        """Seconds one sweep is expected to take (a guess until one was measured)."""
        return 1.15 * max(self.sweep_walls) if self.sweep_walls else 45.0

    def time_left(self) -> float:
        return self.deadline - time.time()

    def fits(self, phase: str, seconds: float) -> bool:
        if self.time_left() > seconds:
            return True
        print(f"[{self.mode}] skipping {phase}: {self.time_left():.0f}s left, needs ~{seconds:.0f}s", flush=True)
        self.result["skipped"].append(phase)
        self.save()
        return False

    def fresh(self) -> None:
        """Start a sweep from an empty cache with fresh peaks."""
        self.torch.cuda.synchronize()
        self.torch.cuda.empty_cache()
        self.torch.cuda.reset_peak_memory_stats(0)

    def policy(self, *, on: bool) -> Any:
        from zmon.config import PolicyConfig
        from zmon.policy import PolicyRunner

        rules = {"reserved_unallocated_high": {"for_samples": 1, "cooldown_seconds": 0}}
        return PolicyRunner(
            PolicyConfig.model_validate({"rules": rules, "dry_run": not on}),
            remediator=recording_remediator(dry_run=not on),
        )

    def call(self, size: int, seed: int) -> None:
        torch = self.torch
        self.pipe(
            prompt=PROMPT,
            width=size,
            height=size,
            num_inference_steps=STEPS,
            guidance_scale=0.0,
            generator=torch.Generator("cuda").manual_seed(seed),
        )
        torch.cuda.synchronize()

    def generate(self, index: int, size: int, policy: Any, oom: Any | None) -> Gen:
        """One generation bracketed by the policy; with `oom` (policy on) OOM is recovered as zmon run does."""
        torch = self.torch
        torch.cuda.reset_peak_memory_stats(0)
        log = policy.remediator.log
        mark = len(log)
        status, error, attempts, ooms, seconds = "error", "", 0, 0, 0.0
        decisions: list[str] = []
        while True:
            attempts += 1
            policy.generation_started()
            t0 = time.perf_counter()
            failed = False
            try:
                self.call(size, seed=index)
                status = "ok"
            except torch.OutOfMemoryError as e:
                status, error, failed, ooms = "oom", str(e).splitlines()[0][:200], True, ooms + 1
                if oom is not None:
                    oom.snapshot(index, attempts - 1)
            except Exception as e:  # keep the sweep going whatever happens
                status, error = "error", f"{type(e).__name__}: {e}"[:300]
            seconds += time.perf_counter() - t0
            # still inside the generation for the gate: a decision is queued for the safe point just below
            sample = self.provider.sample()
            before = mem(sample)
            decisions += [f"{d.rule}:{d.event}" for d in policy.observe(sample)]
            policy.generation_finished()  # the safe point: queued actions run here
            # out of the except block, so the failed call's tensors are gone: empty_cache, then one retry
            if not failed or oom is None or not oom.recover(index, attempts - 1):
                break
        # between generations, as zmon's sampler would see it (idle: an action would run at once)
        decisions += [f"{d.rule}:{d.event}" for d in policy.observe(self.provider.sample())]
        stats = torch.cuda.memory_stats(0)
        return Gen(
            index,
            size,
            status,
            seconds,
            attempts,
            ooms,
            int(stats.get("allocated_bytes.all.peak", 0)),
            int(stats.get("reserved_bytes.all.peak", 0)),
            before,
            mem(self.provider.sample()),
            decisions,
            [action(r) for r in log[mark:]],
            error,
        )

    def sweep(self, name: str, *, on: bool) -> dict[str, Any]:
        from zmon.config import OomConfig
        from zmon.workload.oom import OomHandler

        policy = self.policy(on=on)
        oom = OomHandler(OomConfig(), remediator=policy.remediator, state=policy.state) if on else None
        self.fresh()
        start = mem(self.provider.sample())
        t0 = time.perf_counter()
        gens = []
        for i, size in enumerate(SWEEP):
            g = self.generate(i, size, policy, oom)
            gens.append(g)
            ec = [a for a in g.actions if a["action"] == "empty_cache"]
            print(
                f"[{self.mode}/{name}] {size:>4}² {g.status:<5} {g.seconds:6.2f}s  ratio "
                f"{_f(g.before.reserved_unallocated_ratio)}→{_f(g.after.reserved_unallocated_ratio)}  frag "
                f"{_f(g.before.fragmentation_ratio)}  alloc retries so far {g.after.alloc_retries}  "
                + (
                    f"empty_cache {ec[0]['result']} {(ec[0]['freed_bytes'] or 0) / GIB:.2f} GiB "
                    f"{ec[0]['seconds'] * 1e3:.1f} ms"
                    if ec
                    else ""
                ),
                flush=True,
            )
        wall = time.perf_counter() - t0
        self.sweep_walls.append(wall)
        summary = summarize(gens)
        if start.alloc_retries is not None and gens[-1].after.alloc_retries is not None:
            summary["alloc_retries_in_sweep"] = gens[-1].after.alloc_retries - start.alloc_retries
        if start.ooms is not None and gens[-1].after.ooms is not None:
            summary["allocator_ooms_in_sweep"] = gens[-1].after.ooms - start.ooms
        snap = policy.state.snapshot()
        return {
            "policy": "on" if on else "off (dry run)",
            "wall_seconds": wall,
            "start": asdict(start),
            "summary": summary,
            "decisions": [list(d) for d in snap.decisions],
            "generations": [asdict(g) for g in gens],
        }

    # -- phases -----------------------------------------------------------------------------------------

    def run(self) -> None:
        phases = self.result["phases"]
        self.guarded("warmup", self.warmup)
        for name, on in (("observe", False), ("policy", True)):
            if self.fits(name, self.sweep_estimate):
                self.guarded(name, functools.partial(self.sweep, name, on=on))
        self.guarded("capped", lambda: self.capped(phases))
        if self.fits("oom", 30):
            self.guarded("oom", self.forced_oom)

    def guarded(self, name: str, fn: Callable[[], dict[str, Any] | None]) -> None:
        """Run one phase; a failure is recorded and the next phase still runs."""
        try:
            res = fn()
            if res is not None:
                self.result["phases"][name] = res
        except Exception as e:
            traceback.print_exc()
            self.result.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:1000]
            self.fresh()
        self.save()

    def warmup(self) -> dict[str, Any]:
        """Kernels and cuBLAS handles first (512²), then the largest shape alone from an emptied cache."""
        torch = self.torch
        t0 = time.perf_counter()
        self.call(512, seed=0)
        self.fresh()
        t1 = time.perf_counter()
        try:
            self.call(1536, seed=0)
            status = "ok"
        except torch.OutOfMemoryError:
            status = "oom"  # the peaks below are then those at the failure
        stats = torch.cuda.memory_stats(0)
        self.iso: dict[str, Any] = {
            "status": status,
            "peak_allocated": int(stats["allocated_bytes.all.peak"]),
            "peak_reserved": int(stats["reserved_bytes.all.peak"]),
            "seconds_1536": time.perf_counter() - t1,
        }
        print(
            f"[{self.mode}] 1536² alone ({status}): peak allocated {self.iso['peak_allocated'] / GIB:.1f} GiB, "
            f"reserved {self.iso['peak_reserved'] / GIB:.1f} GiB of {self.total / GIB:.1f}",
            flush=True,
        )
        return {"seconds": time.perf_counter() - t0, "largest_alone": self.iso}

    def capped(self, phases: dict[str, Any]) -> None:
        """The sweep off and on under a memory cap (results go straight into `phases`, saved as they come)."""
        torch = self.torch
        if not hasattr(self, "iso"):
            raise RuntimeError("no warm-up figures to size the cap from")
        caps = [("capped", self.iso["peak_reserved"] * 1.02)]
        tighter = (self.iso["peak_allocated"] + self.iso["peak_reserved"]) / 2
        try:
            for name, cap in caps:
                if not self.fits(name, 2 * self.sweep_estimate):
                    return
                fraction = min(1.0, cap / self.total)
                torch.cuda.set_per_process_memory_fraction(fraction, 0)
                res: dict[str, Any] = {"cap_bytes": int(cap), "fraction": fraction}
                print(f"[{self.mode}/{name}] cap {cap / GIB:.1f} GiB = {fraction:.3f} of the card", flush=True)
                for variant, on in (("off", False), ("on", True)):
                    res[variant] = self.sweep(f"{name}-{variant}", on=on)
                    phases[name] = res
                    self.save()
                off = res["off"]["summary"]
                if not off["alloc_retries_in_sweep"] and not off["oom"] and name == "capped":
                    caps.append(("capped_tighter", tighter))
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, 0)

    def forced_oom(self) -> dict[str, Any]:
        """zmon.workload.oom on the real allocator: history recording, snapshot, empty_cache, retry."""
        from zmon.config import OomConfig
        from zmon.policy import PolicyState, Remediator
        from zmon.workload.oom import OomHandler

        torch = self.torch
        self.fresh()
        state = PolicyState()
        with tempfile.TemporaryDirectory(prefix="zmon-oom-") as d:
            h = OomHandler(
                OomConfig(memory_snapshot_dir=Path(d), max_snapshots=2), remediator=Remediator(), state=state
            )
            recording = h.start()
            cap = self.weights + 4 * GIB  # room for text encoding, not for a 1536² denoise
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / self.total), 0)
            statuses = []
            t0 = time.perf_counter()
            try:
                for attempt in range(3):  # guard: the handler must stop after one retry
                    failed = False
                    try:
                        self.call(1536, seed=0)
                        statuses.append("ok")
                    except torch.OutOfMemoryError:
                        statuses.append("oom")
                        h.snapshot(0, attempt)
                        failed = True
                    if not failed or not h.recover(0, attempt):
                        break
            finally:
                torch.cuda.set_per_process_memory_fraction(1.0, 0)
                h.stop()
            files = {p.name: p.stat().st_size for p in sorted(Path(d).iterdir())}
        res = {
            "recording": recording,
            "cap_bytes": cap,
            "statuses": statuses,
            "seconds": time.perf_counter() - t0,
            "snapshots": files,
            "empty_cache": [asdict(e.empty_cache) for e in h.events],
            "retry_decisions": [e.retry for e in h.events],
            "policy_state_actions": [list(a) for a in state.snapshot().actions],
        }
        print(
            f"[{self.mode}/oom] {statuses} snapshots {files} empty_cache "
            f"{[(e.empty_cache.result, e.empty_cache.freed_bytes) for e in h.events]}",
            flush=True,
        )
        return res


def _f(x: float | None) -> str:
    return "  -  " if x is None else f"{x:.3f}"


def child_main(mode: str, out: Path, deadline: float) -> None:
    c = Child(mode, out, deadline)
    try:
        c.run()
    finally:
        c.result["finished_at"] = time.time()
        c.save()


# ---------------------------------------------------------------------------------------------- orchestrator


def run_child(mode: str, out: Path, deadline: float) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ALLOC_CONF_VARS}
    conf = MODES[mode]
    if conf is not None:
        env["PYTORCH_CUDA_ALLOC_CONF"] = conf
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.gpu_sweep",
        "--out",
        str(out),
        "--child",
        mode,
        "--deadline",
        f"{deadline:.0f}",
    ]
    print(f"=== {mode}: PYTORCH_CUDA_ALLOC_CONF={conf or '(unset)'}", flush=True)
    t0 = time.time()
    try:
        rc = subprocess.run(cmd, env=env, timeout=max(30.0, deadline - time.time() + 25)).returncode
    except subprocess.TimeoutExpired:
        rc = -9
    path = out / f"sweep-{mode}.json"
    data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"mode": mode, "phases": {}}
    data["returncode"], data["process_seconds"] = rc, time.time() - t0
    return data


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows
    )


def gib(x: Any) -> str:
    return "-" if x is None else f"{x / GIB:.2f}"


def num(x: Any, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def report(results: dict[str, dict[str, Any]]) -> str:
    """The summary table (one row per sweep), then per mode the policy sweep and the other phases."""
    rows = [
        [
            "mode/phase",
            "ok",
            "oom",
            "ooms(att)",
            "retries",
            "p50 s",
            "p95 s",
            "total s",
            "max ratio",
            "last ratio",
            "max frag",
            "peak res GiB",
            "ec n",
            "ec ms",
            "freed GiB",
        ]
    ]
    for mode, data in results.items():
        for phase, p in data.get("phases", {}).items():
            sweeps = [(phase, p)] if "summary" in p else [(f"{phase}-{v}", p[v]) for v in ("off", "on") if v in p]
            for label, sweep in sweeps:
                s = sweep["summary"]
                rows.append(
                    [
                        f"{mode}/{label}",
                        str(s["ok"]),
                        str(s["oom"]),
                        str(s["oom_attempts"]),
                        num(s.get("alloc_retries_in_sweep"), "{}"),
                        num(s["p50_s"]),
                        num(s["p95_s"]),
                        num(s["total_s"], "{:.1f}"),
                        num(s["max_reserved_unallocated_ratio"]),
                        num(s["last_reserved_unallocated_ratio"]),
                        num(s["max_fragmentation_ratio"]),
                        gib(s["max_peak_reserved"]),
                        str(s["empty_cache_calls"]),
                        num(s["empty_cache_ms_median"], "{:.1f}"),
                        gib(s["freed_bytes"]),
                    ]
                )
    lines = [
        "ratio = (reserved − allocated)/reserved at the end of each generation (before the safe point); "
        "frag = inactive_split/reserved; retries = num_alloc_retries during the sweep; "
        "ec = empty_cache (ok) at safe points",
        table(rows),
        "",
    ]
    for mode, data in results.items():
        phases = data.get("phases", {})
        lines += policy_table(mode, phases.get("policy"))
        oom = phases.get("oom")
        if oom:
            lines.append(
                f"{mode}: forced OOM → {oom['statuses']}, retry decisions {oom['retry_decisions']}, "
                f"snapshots {oom['snapshots']}, policy counters {oom['policy_state_actions']}"
            )
        for k in ("capped", "capped_tighter"):
            if k in phases:
                lines.append(
                    f"{mode}: {k} at {phases[k]['cap_bytes'] / GIB:.1f} GiB (fraction {phases[k]['fraction']:.3f})"
                )
        if data.get("skipped"):
            lines.append(f"{mode}: skipped (deadline) {data['skipped']}")
        if data.get("errors"):
            lines.append(f"{mode}: failed phases {data['errors']}")
        lines.append(
            f"{mode}: exit {data.get('returncode')}, {data.get('process_seconds', 0):.0f}s, "
            f"build {data.get('build_seconds', 0):.1f}s, card {data.get('card')}"
        )
        lines.append("")
    return "\n".join(lines)


def policy_table(mode: str, pol: dict[str, Any] | None) -> list[str]:
    """One row per generation of the sweep with the policy on."""
    if not pol:
        return []
    rows = [
        [
            "gen",
            "size",
            "status",
            "s",
            "ratio before",
            "after",
            "frag before",
            "headroom GiB",
            "actions",
            "freed GiB",
            "ec ms",
        ]
    ]
    for g in pol["generations"]:
        ec = [a for a in g["actions"] if a["action"] == "empty_cache"]
        rows.append(
            [
                str(g["index"]),
                str(g["size"]),
                g["status"],
                f"{g['seconds']:.2f}",
                num(g["before"]["reserved_unallocated_ratio"]),
                num(g["after"]["reserved_unallocated_ratio"]),
                num(g["before"]["fragmentation_ratio"]),
                gib(g["before"]["headroom"]),
                ",".join(f"{a['action']}:{a['result']}" for a in g["actions"]) or "-",
                gib(sum(a["freed_bytes"] or 0 for a in ec)) if ec else "-",
                ",".join(f"{a['seconds'] * 1e3:.1f}" for a in ec) or "-",
            ]
        )
    return [f"{mode}: sweep with the policy on (reserved_unallocated_high: for_samples 1, cooldown 0)", table(rows), ""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--child", choices=sorted(MODES), help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="seconds for both processes")
    ap.add_argument("--modes", default="default,expandable", help="allocator settings to run, in order")
    args = ap.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.child:
        child_main(args.child, out, args.deadline or time.time() + args.budget)
        return 0

    start = time.time()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    # the default allocator gets ~55% of the budget: its process runs first and both build the model once
    shares = {"default": 0.55, "expandable": 0.45} if len(modes) == 2 else dict.fromkeys(modes, 1 / len(modes))
    results: dict[str, dict[str, Any]] = {}
    edge = start
    for mode in modes:
        edge += args.budget * shares.get(mode, 1 / len(modes))
        results[mode] = run_child(mode, out, edge if mode != modes[-1] else start + args.budget)
        (out / "gpu_sweep.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    text = report(results)
    (out / "gpu_sweep.txt").write_text(text + "\n")
    print(text)
    print(f"total {time.time() - start:.0f}s")
    return 0 if all(r.get("returncode") == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
