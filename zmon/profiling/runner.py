"""`zmon profile`: load (or take) a pipeline, measure I/O, generations and resource samples, then diagnose."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from zmon.config import Config, ModelConfig
from zmon.instrumentation.records import GenerationRecord
from zmon.profiling.diagnosis import Diagnosis, diagnose
from zmon.profiling.facts import (
    CacheState,
    CpuSample,
    EnvironmentFacts,
    GpuSample,
    IoFacts,
    MemoryFacts,
    ProfileFacts,
    build_facts,
    cpu_samples_from_counters,
)
from zmon.profiling.report import render_markdown, write_reports

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
TRACE_GENERATIONS = 2  # generations covered by --trace and by --memory-snapshot (each its own phase)
MEMORY_HISTORY_MAX_ENTRIES = 100_000  # allocation events kept by torch.cuda.memory._record_memory_history
WEIGHT_SUFFIXES = (".safetensors", ".bin")
DISK_CHUNK_BYTES = 8 * 1024 * 1024
DENOISER_NAMES = ("transformer", "transformer_2", "unet")


# ------------------------------------------------------------------------------------------------ progress


class Progress:
    """A `\\r` text bar on a terminal; one line per phase (start and end) when the stream is not a TTY."""

    def __init__(self, stream: TextIO | None = None, *, width: int = 30, enabled: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.enabled = enabled
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._label = ""
        self._total = 0
        self._done = 0
        self._started = 0.0

    def _write(self, text: str) -> None:
        if self.enabled:
            self.stream.write(text)
            self.stream.flush()

    def start(self, label: str, total: int) -> None:
        self._label, self._total, self._done, self._started = label, total, 0, time.monotonic()
        if self._tty:
            self._draw()
        else:
            self._write(f"{label}: {total} generation(s)\n")

    def advance(self, seconds: float | None = None) -> None:
        self._done += 1
        if self._tty:
            self._draw(seconds)
        if self._done >= self._total:
            self.finish()

    def _draw(self, seconds: float | None = None) -> None:
        filled = self.width * self._done // max(1, self._total)
        bar = "#" * filled + "." * (self.width - filled)
        last = f"  last {seconds:.3f} s" if seconds is not None else ""
        self._write(f"\r{self._label:<10} [{bar}] {self._done}/{self._total}{last}")

    def finish(self) -> None:
        elapsed = time.monotonic() - self._started
        if self._tty:
            self._write(f"  ({elapsed:.1f} s)\n")
        else:
            self._write(f"{self._label}: done in {elapsed:.1f} s\n")

    def note(self, message: str) -> None:
        self._write(f"{message}\n")


# ------------------------------------------------------------------------------------------------ I/O


@dataclass(frozen=True)
class DiskSpeed:
    """Sequential throughput of one filesystem, bytes per second."""

    read_bytes_per_second: float
    write_bytes_per_second: float
    bytes_tested: int


def local_model_dir(model: ModelConfig) -> Path | None:
    """The directory the weights will be read from, without loading anything (None: not on disk yet)."""
    from zmon.workload.tiny import ensure_builtin, is_builtin

    if is_builtin(model.id):
        return ensure_builtin(model.id, model.cache_dir)  # builds it once, so the load below is a pure read
    path = Path(model.id).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model.id, local_files_only=True))
    except Exception:  # not a hub id, or not cached: loading will download it
        return None


def weight_files(model_dir: Path) -> list[Path]:
    """Every weight file under the model directory (symlinks into the hub cache resolved)."""
    out = []
    for p in sorted(model_dir.rglob("*")):
        if p.name.endswith(WEIGHT_SUFFIXES):
            real = p.resolve()
            if real.is_file():
                out.append(real)
    return out


def drop_page_cache(files: Sequence[Path]) -> CacheState:
    """Evict the files from the page cache so the load reads the disk: "cold" when done, else "warm".

    posix_fadvise(DONTNEED) per file needs no privileges (dirty pages are flushed first, since only clean
    pages can be dropped); /proc/sys/vm/drop_caches is the fallback when running as root. Pages another
    process keeps mapped stay resident: the result is best effort.
    """
    if not files:
        return "unknown"
    fadvise = getattr(os, "posix_fadvise", None)
    if fadvise is not None:
        try:
            for f in files:
                fd = os.open(f, os.O_RDONLY)
                try:
                    with contextlib.suppress(OSError):
                        os.fsync(fd)
                    fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
            return "cold"
        except OSError as e:
            log.debug("posix_fadvise failed: %s", e)
    drop = Path("/proc/sys/vm/drop_caches")
    if hasattr(os, "geteuid") and os.geteuid() == 0 and os.access(drop, os.W_OK):
        try:
            os.sync()
            drop.write_text("1\n")
            return "cold"
        except OSError as e:
            log.debug("drop_caches failed: %s", e)
    return "warm"


def disk_speed_test(directory: Path, nbytes: int) -> DiskSpeed:
    """Write `nbytes` sequentially (fsync included), evict them from the page cache, read them back.

    The temporary file lives in `directory` (so the figure is that filesystem's) and is always removed.
    Raises OSError when the directory is not writable.
    """
    path = directory / f".zmon-disktest-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    chunk = os.urandom(min(DISK_CHUNK_BYTES, nbytes))  # incompressible, so compressing filesystems can't cheat
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        t0 = time.perf_counter()
        written = 0
        try:
            while written < nbytes:
                view = memoryview(chunk)[: min(len(chunk), nbytes - written)]
                while view:
                    n = os.write(fd, view)
                    written += n
                    view = view[n:]
            os.fsync(fd)
            write_seconds = time.perf_counter() - t0
            _fadvise_dontneed(fd)
        finally:
            os.close(fd)
        fd = os.open(path, os.O_RDONLY)
        try:
            _fadvise_dontneed(fd)
            t0 = time.perf_counter()
            read = 0
            while block := os.read(fd, DISK_CHUNK_BYTES):
                read += len(block)
            read_seconds = time.perf_counter() - t0
        finally:
            os.close(fd)
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
    return DiskSpeed(
        read_bytes_per_second=read / max(read_seconds, 1e-9),
        write_bytes_per_second=written / max(write_seconds, 1e-9),
        bytes_tested=written,
    )


def _fadvise_dontneed(fd: int) -> None:
    fadvise = getattr(os, "posix_fadvise", None)
    if fadvise is not None:
        with contextlib.suppress(OSError):
            fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


@dataclass
class LoadResult:
    """A pipeline loaded for profiling and what the load and the disk measured."""

    loaded: Any  # zmon.workload.loading.LoadedPipeline
    io: IoFacts
    notes: list[str] = field(default_factory=list)


def load_for_profile(cfg: Config, progress: Progress | None = None) -> LoadResult:
    """Evict the weights from the page cache (when possible), load the pipeline, then test the disk."""
    from zmon.workload.loading import load_pipeline

    notes: list[str] = []
    model_dir = local_model_dir(cfg.model)
    cache_state: CacheState = "unknown"
    if model_dir is not None:
        cache_state = drop_page_cache(weight_files(model_dir))
        if cache_state == "warm":
            notes.append("page cache could not be dropped: the checkpoint load is measured warm")
    if progress:
        progress.note(f"loading {cfg.model.id} ({cache_state} page cache)")
    loaded = load_pipeline(cfg.model, img2img=bool(cfg.workload.init_images))
    model_dir = model_dir or loaded.path
    disk: DiskSpeed | None = None
    nbytes = cfg.profiling.disk_test_bytes
    if nbytes > 0 and model_dir is not None:
        try:
            disk = disk_speed_test(model_dir, nbytes)
        except OSError as e:
            notes.append(f"disk test skipped: cannot write a test file in {model_dir}: {e.strerror or e}")
    io = IoFacts(
        model_dir=None if model_dir is None else str(model_dir),
        checkpoint_load_seconds=loaded.load_seconds,
        checkpoint_bytes=loaded.checkpoint_bytes,
        checkpoint_read_bytes_per_second=loaded.read_bytes_per_second,
        cache_state=cache_state,
        disk_read_bytes_per_second=None if disk is None else disk.read_bytes_per_second,
        disk_write_bytes_per_second=None if disk is None else disk.write_bytes_per_second,
    )
    if progress:
        rate = "" if not loaded.read_bytes_per_second else f", {loaded.read_bytes_per_second / 1e6:.0f} MB/s"
        progress.note(f"loaded {loaded.class_name} on {loaded.device} ({loaded.dtype}) in "
                      f"{loaded.load_seconds:.2f} s{rate}")
    return LoadResult(loaded, io, notes)


# ------------------------------------------------------------------------------------------------ sampling


def torch_device_index(device: str) -> int | None:
    """'cuda:1' → 1, 'cuda' → the current CUDA device, anything else → None."""
    if not device.startswith("cuda"):
        return None
    _, _, idx = device.partition(":")
    if idx:
        return int(idx)
    try:
        import torch

        return int(torch.cuda.current_device())
    except Exception:
        return 0


def nvml_index_for(torch_index: int, gpus: Sequence[Any]) -> int | None:
    """The NVML index of CUDA device `torch_index` among `gpus` (providers.nvml.GpuSample): by UUID, then PCI
    bus id, then position when CUDA_VISIBLE_DEVICES does not renumber, then the only GPU."""
    props: Any = None
    try:
        import torch

        props = torch.cuda.get_device_properties(torch_index)
    except Exception:
        props = None
    if props is not None:
        want = str(getattr(props, "uuid", "") or "").lower().removeprefix("gpu-")
        for g in gpus:
            if want and g.uuid and g.uuid.lower().removeprefix("gpu-") == want:
                return int(g.index)
        bus = getattr(props, "pci_bus_id", None)
        dev = getattr(props, "pci_device_id", None)
        dom = getattr(props, "pci_domain_id", None)
        if bus is not None and dev is not None:
            for g in gpus:
                parsed = _parse_pci(g.pci_bus_id)
                if parsed is not None and parsed[1:] == (int(bus), int(dev)) and (
                    dom is None or parsed[0] == int(dom)
                ):
                    return int(g.index)
    if not os.environ.get("CUDA_VISIBLE_DEVICES") and any(g.index == torch_index for g in gpus):
        return torch_index
    return int(gpus[0].index) if len(gpus) == 1 else None


def _parse_pci(bus_id: str | None) -> tuple[int, int, int] | None:
    """'00000000:3B:00.0' → (domain, bus, device)."""
    if not bus_id:
        return None
    try:
        domain, bus, rest = bus_id.split(":")
        return int(domain, 16), int(bus, 16), int(rest.split(".")[0], 16)
    except ValueError:
        return None


class ResourceSampler:
    """Background thread: NVML util/memory of one GPU and process/host CPU, every `interval_seconds`.

    Providers are optional (None = not sampled): on a CPU-only host there is no NVML and so no GPU sample.
    """

    def __init__(
        self,
        interval_seconds: float,
        *,
        nvml: Any | None = None,  # zmon.providers.nvml.NvmlProvider
        nvml_index: int | None = None,
        process: Any | None = None,  # zmon.providers.host.ProcessProvider
        host: Any | None = None,  # zmon.providers.host.HostProvider
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.interval = interval_seconds
        self._nvml, self._nvml_index = nvml, nvml_index
        self._process, self._host = process, host
        self._clock = clock
        self._gpu: list[GpuSample] = []
        self._cpu_points: list[tuple[float, float | None, float | None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0

    def sample_once(self) -> None:
        t = self._clock()
        if self._nvml is not None and self._nvml_index is not None:
            try:
                gpu = next((g for g in self._nvml.sample().gpus if g.index == self._nvml_index), None)
            except Exception:
                self.errors += 1
                gpu = None
            if gpu is not None and gpu.up:
                self._gpu.append(GpuSample(t, gpu.utilization_gpu_ratio, gpu.memory_used_bytes))
        if self._process is None and self._host is None:
            return
        cpu_seconds = host_ratio = None
        try:
            if self._process is not None:
                p = self._process.sample()
                if p.exists and p.cpu_user_seconds is not None and p.cpu_system_seconds is not None:
                    cpu_seconds = p.cpu_user_seconds + p.cpu_system_seconds
            if self._host is not None:
                host_ratio = self._host.sample().cpu_utilization_ratio
        except Exception:
            self.errors += 1
        self._cpu_points.append((t, cpu_seconds, host_ratio))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample_once()

    def start(self) -> None:
        self.sample_once()  # the baseline for CPU deltas, taken before the first generation
        self._thread = threading.Thread(target=self._loop, name="zmon-profile-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.sample_once()  # closes the last interval at the end of the last generation

    @property
    def gpu_samples(self) -> tuple[GpuSample, ...]:
        return tuple(self._gpu)

    @property
    def cpu_samples(self) -> tuple[CpuSample, ...]:
        return cpu_samples_from_counters(self._cpu_points)


def _providers(device: str, note: Callable[[str], None]) -> tuple[Any, int | None, Any, Any]:
    """(nvml provider, NVML index of the profiled GPU, process provider, host provider); None when absent."""
    nvml: Any = None
    index: int | None = None
    torch_index = torch_device_index(device)
    if torch_index is not None:
        try:
            from zmon.providers.nvml import NvmlProvider

            nvml = NvmlProvider(processes=False)
            index = nvml_index_for(torch_index, nvml.sample().gpus)
            if index is None:
                note(f"cannot tell which NVML GPU is {device}: GPU utilization not sampled")
        except Exception as e:  # SourceUnavailable, ImportError
            note(f"NVML unavailable ({e}): GPU utilization not sampled")
            nvml = None
    try:
        from zmon.providers.host import HostProvider, ProcessProvider

        return nvml, index, ProcessProvider(os.getpid()), HostProvider(per_cpu=False)
    except ImportError as e:
        note(f"psutil unavailable ({e}): CPU use not sampled")
        return nvml, index, None, None


# ------------------------------------------------------------------------------------------------ environment


def _first_param(module: Any) -> Any:
    try:
        return next(module.parameters(), None)
    except Exception:
        return None


def denoiser(pipe: Any) -> Any:
    """The pipeline's denoiser module (transformer or unet), compiled or not; None if it has none."""
    return next((m for name in DENOISER_NAMES if (m := getattr(pipe, name, None)) is not None), None)


def pipeline_device(pipe: Any) -> str:
    """Where the denoiser's weights live ("cuda:0", "cpu"): the device the generations run on."""
    module = denoiser(pipe)
    param = None if module is None else _first_param(module)
    return "cpu" if param is None else str(param.device)


def is_compiled(pipe: Any) -> bool:
    return any(type(getattr(pipe, n, None)).__name__ == "OptimizedModule" for n in DENOISER_NAMES)


def attention_backend(device: str) -> str:
    """diffusers' dispatcher backend when set, and on CUDA which SDPA kernels torch may pick."""
    parts = []
    forced = os.environ.get("DIFFUSERS_ATTN_BACKEND")
    if forced:
        parts.append(f"diffusers:{forced}")
    try:
        import torch

        if device.startswith("cuda"):
            b = torch.backends.cuda
            kernels = [
                name
                for name, on in (
                    ("flash", b.flash_sdp_enabled()),
                    ("mem_efficient", b.mem_efficient_sdp_enabled()),
                    ("cudnn", getattr(b, "cudnn_sdp_enabled", lambda: False)()),
                    ("math", b.math_sdp_enabled()),
                )
                if on
            ]
            parts.append(f"sdpa[{','.join(kernels)}]")
        else:
            parts.append("sdpa (cpu)")
    except Exception:
        parts.append("unknown")
    return " ".join(parts)


def environment_facts(
    pipe: Any,
    *,
    model_id: str,
    distilled: bool | None = None,
    nvml_gpu: Any | None = None,  # providers.nvml.GpuSample of the profiled card
    driver_version: str | None = None,
) -> EnvironmentFacts:
    """Versions, devices, dtype, attention backend, torch.compile and allocator settings of a pipeline."""
    import torch

    from zmon.providers.allocator import settings_from_env

    module = denoiser(pipe)
    param = None if module is None else _first_param(module)
    device = pipeline_device(pipe)
    te = getattr(pipe, "text_encoder", None)
    te_param = _first_param(te) if te is not None else None
    te_device = str(te_param.device) if te_param is not None else None
    card = None
    if nvml_gpu is not None and nvml_gpu.name:
        card = nvml_gpu.name
    elif device.startswith("cuda"):
        with contextlib.suppress(Exception):
            card = torch.cuda.get_device_name(torch.device(device))
    return EnvironmentFacts(
        card_name=card,
        driver_version=driver_version,
        cuda_version=torch.version.cuda,
        torch_version=torch.__version__,
        diffusers_version=_version("diffusers"),
        transformers_version=_version("transformers"),
        python_version=platform.python_version(),
        device=device,
        text_encoder_device=te_device if te_device != device else None,
        dtype=None if param is None else str(param.dtype).removeprefix("torch."),
        attention_backend=attention_backend(device),
        compiled=is_compiled(pipe),
        alloc_conf=settings_from_env().alloc_conf,
        model_id=model_id,
        pipeline_class=type(pipe).__name__,
        distilled=distilled,
        cpu_count=os.cpu_count(),
    )


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return None


def allocator_memory(device: str) -> MemoryFacts:
    """MemoryFacts from the caching allocator after the run (CUDA only; empty elsewhere).

    Peaks are left to the generation records (stage timing resets the peak statistics per generation).
    """
    index = torch_device_index(device)
    if index is None:
        return MemoryFacts()
    try:
        from zmon.providers.allocator import AllocatorProvider

        dev = AllocatorProvider(devices=[index]).sample().device(index)
    except Exception as e:
        log.debug("allocator statistics unavailable: %s", e)
        return MemoryFacts()
    if dev is None:
        return MemoryFacts()
    return MemoryFacts(
        card_total_bytes=dev.total_bytes,
        reserved_unallocated_ratio=dev.reserved_unallocated_ratio,
        fragmentation_ratio=dev.fragmentation_ratio,
        headroom_bytes=dev.headroom_bytes,
        alloc_retries=dev.alloc_retries,
        ooms=dev.ooms,
    )


# ------------------------------------------------------------------------------------------------ generations


@dataclass
class ProfileResult:
    """What one profile measured, where the reports went, and notes worth telling the user."""

    facts: ProfileFacts
    diagnosis: Diagnosis
    records: list[GenerationRecord]  # warm-up and measured generations, in order
    wall_seconds: list[float]  # wall time of each pipeline call, parallel to the calls made
    paths: dict[str, Path] = field(default_factory=dict)  # report format → file
    trace: Any = None  # zmon.profiling.trace.TraceOutputs when --trace
    memory_snapshot: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def measured_wall_seconds(self) -> list[float]:
        return self.wall_seconds[self.facts.baseline.warmup :]


class WorkloadCaller:
    """Calls the pipeline with the i-th item of the workload spec (as `zmon run` would)."""

    def __init__(self, pipe: Any, spec: Any) -> None:
        self.pipe = pipe
        self.spec = spec  # zmon.workload.spec.WorkloadSpec
        self._images: list[Any] = []
        if spec.img2img:
            from PIL import Image

            for p in spec.init_images:
                with Image.open(p) as im:
                    self._images.append(im.convert("RGB"))

    def __call__(self, i: int) -> float:
        """One generation; returns its wall seconds. Failures are logged (the record says how it ended)."""
        import torch

        kwargs = self.spec.pipeline_kwargs(i, self._images)
        width, height = kwargs["width"], kwargs["height"]
        t0 = time.perf_counter()
        try:
            self.pipe(**kwargs)
        except torch.OutOfMemoryError:
            log.warning("generation %d: out of GPU memory at %dx%d", i, width, height)
        except Exception as e:
            log.warning("generation %d failed: %s: %s", i, type(e).__name__, e)
        return time.perf_counter() - t0


def workload_spec(cfg: Config, pipe: Any, model_id: str) -> Any:
    """The resolved workload for this pipeline (model defaults filled in); raises WorkloadError."""
    from zmon.workload.loading import model_defaults, vae_scale_factor
    from zmon.workload.spec import WorkloadError, build_spec, recheck_resolutions

    spec = build_spec(cfg, model_defaults(pipe, model_id))
    problems = recheck_resolutions(spec, vae_scale_factor(pipe))
    if problems:
        raise WorkloadError(problems)
    return spec


def profile_pipeline(
    pipe: Any,
    cfg: Config,
    *,
    out_dir: Path | None = None,
    runs: int | None = None,
    warmup: int | None = None,
    io: IoFacts | None = None,
    model_id: str | None = None,
    trace: bool = False,
    memory_snapshot: bool = False,
    progress: Progress | None = None,
    write: bool = True,
) -> ProfileResult:
    """Profile an already-built pipeline: warm-up + measured generations with stage timing and sampling,
    then (optionally) a torch.profiler trace and a CUDA memory snapshot of TRACE_GENERATIONS more each.

    The pipeline must not carry zmon stage timing already (attach/run); it is left as it was. `io` carries
    what loading measured (`load_for_profile`); `model_id` defaults to cfg.model.id. Reports are written to
    `out_dir` (default profiling.output_dir) unless `write` is False.
    """
    from zmon.instrumentation.stages import StageTimingConfig, apply_stage_timing

    prof = cfg.profiling
    runs = prof.runs if runs is None else runs
    warmup = prof.warmup if warmup is None else warmup
    out = Path(out_dir if out_dir is not None else prof.output_dir)
    model = model_id or cfg.model.id
    spec = workload_spec(cfg, pipe, model)
    progress = progress or Progress(enabled=False)
    notes: list[str] = []

    def note(message: str) -> None:
        notes.append(message)
        progress.note(f"note: {message}")

    nvml, nvml_index, process, host = _providers(pipeline_device(pipe), note)
    nvml_gpu = None
    if nvml is not None and nvml_index is not None:
        with contextlib.suppress(Exception):
            nvml_gpu = next(g for g in nvml.sample().gpus if g.index == nvml_index)
    env = environment_facts(
        pipe, model_id=model, distilled=spec.distilled, nvml_gpu=nvml_gpu,
        driver_version=getattr(nvml, "driver_version", None),
    )

    cache = None
    if cfg.workload.prompt_cache.enabled:
        from zmon.instrumentation.prompt_cache import apply_prompt_cache

        cache = apply_prompt_cache(pipe, cfg.workload.prompt_cache)
    records: list[GenerationRecord] = []
    wall: list[float] = []
    generate = WorkloadCaller(pipe, spec)
    sampler = ResourceSampler(
        prof.sample_interval_seconds, nvml=nvml, nvml_index=nvml_index, process=process, host=host
    )
    result_trace: Any = None
    snapshot: Path | None = None
    try:
        timing = apply_stage_timing(pipe, StageTimingConfig(on_record=records.append))
        sampler.start()
        try:
            i = 0
            for label, count in (("warm-up", warmup), ("measure", runs)):
                if count == 0:
                    continue
                progress.start(label, count)
                for _ in range(count):
                    wall.append(generate(i))
                    i += 1
                    progress.advance(records[-1].total_seconds if records else None)
        finally:
            sampler.stop()
            timing.remove()
        memory = replace(allocator_memory(env.device), card_total_bytes=_card_total(env.device, nvml_gpu))

        if trace:
            from zmon.profiling.trace import capture_trace

            progress.start("trace", TRACE_GENERATIONS)
            # Stage ranges ("zmon/<stage>") only for the trace: record_function has a cost of its own.
            traced = apply_stage_timing(pipe, StageTimingConfig(nvtx=True))
            try:
                result_trace = capture_trace(
                    lambda k: progress.advance(generate(i + k)), TRACE_GENERATIONS, out,
                    cuda=env.on_gpu,
                )
            finally:
                traced.remove()
            i += TRACE_GENERATIONS
            progress.note(f"trace: {result_trace.chrome_trace} and {result_trace.tensorboard_dir}/")
        if memory_snapshot:
            from zmon.profiling.trace import MemorySnapshotUnavailable, capture_memory_snapshot

            try:
                snapshot = capture_memory_snapshot(
                    lambda k: generate(i + k), TRACE_GENERATIONS, out / "memory_snapshot.pickle",
                    max_entries=MEMORY_HISTORY_MAX_ENTRIES, device=env.device,
                )
                progress.note(f"memory snapshot: {snapshot} (open it at https://pytorch.org/memory_viz)")
            except MemorySnapshotUnavailable as e:
                note(str(e))
    finally:
        if cache is not None:
            cache.remove()
        if nvml is not None:
            nvml.close()

    if sampler.errors:
        note(f"{sampler.errors} resource sample(s) failed")
    facts = build_facts(
        records[: warmup + runs],
        gpu_samples=sampler.gpu_samples,
        cpu_samples=sampler.cpu_samples,
        memory=memory,
        io=io,
        env=env,
        warmup=warmup,
    )
    diagnosis = diagnose(facts, prof.thresholds)
    paths = write_reports(facts, diagnosis, out, prof.formats) if write else {}
    return ProfileResult(facts, diagnosis, records, wall, paths, result_trace, snapshot, notes)


def _card_total(device: str, nvml_gpu: Any | None) -> int | None:
    if nvml_gpu is not None and nvml_gpu.memory_total_bytes is not None:
        return int(nvml_gpu.memory_total_bytes)
    if device.startswith("cuda"):
        with contextlib.suppress(Exception):
            import torch

            return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    return None


# ------------------------------------------------------------------------------------------------ CLI body


def profile_main(
    cfg: Config,
    *,
    out_dir: Path | None = None,
    runs: int | None = None,
    warmup: int | None = None,
    trace: bool = False,
    memory_snapshot: bool = False,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """The body of `zmon profile` after validation: load, profile, write reports, print the Markdown."""
    from zmon.workload.spec import WorkloadError

    stdout = stdout or sys.stdout
    progress = Progress(stderr or sys.stderr)
    with contextlib.suppress(Exception):  # diffusers' and transformers' loading bars would garble ours
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    try:
        loaded = load_for_profile(cfg, progress)
    except Exception as e:
        log.exception("cannot load %s", cfg.model.id)
        progress.note(f"error: cannot load {cfg.model.id}: {type(e).__name__}: {e}")
        return EXIT_FAILURE
    for n in loaded.notes:
        progress.note(f"note: {n}")
    try:
        result = profile_pipeline(
            loaded.loaded.pipe, cfg, out_dir=out_dir, runs=runs, warmup=warmup, io=loaded.io,
            model_id=loaded.loaded.model_id, trace=trace, memory_snapshot=memory_snapshot, progress=progress,
        )
    except WorkloadError as e:
        for p in e.problems:
            progress.note(f"error: {p}")
        return 2
    result.notes[:0] = loaded.notes
    stdout.write(render_markdown(result.facts, result.diagnosis))
    stdout.write("\n")
    stdout.flush()
    for fmt, path in result.paths.items():
        progress.note(f"wrote {fmt}: {path}")
    return EXIT_OK
