"""YAML → validated, frozen configuration; every error reported at once; ZMON_ env and CLI overrides.

Every section of the configuration is defined here, in the order of the YAML file (config.example.yaml
documents each key). The policy's rule model and the figure names rules compare come from `zmon.rules`.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import core_schema

from zmon.rules import Op, Rule, compare, default_rules

DEFAULT_PORT = 8739  # outside the fully allocated 9100-9999 exporter range; used by no well-known exporter
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"
ENV_PREFIX = "ZMON_"


class ConfigError(Exception):
    """Raised with every problem found in a configuration, each as 'path: message'."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: {len(problems)} error(s)\n" + "\n".join(f"  - {p}" for p in problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Notes (deprecations, migrations) raised while validating; load_config attaches them to the Config.
_NOTES: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("config notes", default=None)


def _note(text: str) -> None:
    notes = _NOTES.get()
    if notes is not None and text not in notes:
        notes.append(text)


@contextmanager
def _collect_notes() -> Iterator[list[str]]:
    notes: list[str] = []
    token = _NOTES.set(notes)
    try:
        yield notes
    finally:
        _NOTES.reset(token)


# ------------------------------------------------------------------------------------------------ server


def parse_listen(value: str) -> tuple[str, int]:
    """Split 'HOST:PORT' (IPv6 as '[::1]:PORT') into its parts; raises ValueError with a reason."""
    host, sep, port_s = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]")
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"port must be an integer, got {port_s!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0..65535, got {port}")
    return host, port


class ListenAddress(str):
    """'HOST:PORT' parsed once: still the string it was written as, with `.host` and `.port`."""

    host: str
    port: int

    def __new__(cls, value: str) -> ListenAddress:
        host, port = parse_listen(value)
        self = super().__new__(cls, value)
        self.host, self.port = host, port
        return self

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(
            cls, core_schema.str_schema(), serialization=core_schema.to_string_ser_schema()
        )

    def url(self, path: str = "", *, tls: bool = False) -> str:
        """http(s)://HOST:PORT/path, with an IPv6 host bracketed."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if tls else 'http'}://{host}:{self.port}{path}"


class AuthConfig(_Section):
    """Bearer token guarding the endpoints that act (traces, empty_cache, reload)."""

    token_file: Path | None = None
    token_env: str = "ZMON_AUTH_TOKEN"

    def token(self) -> str | None:
        if self.token_file is not None:
            return self.token_file.read_text().strip() or None
        return os.environ.get(self.token_env) or None


class ServerConfig(_Section):
    listen: ListenAddress = ListenAddress(DEFAULT_LISTEN)
    auth: AuthConfig = AuthConfig()
    # Serving limits (zmon.server.http; README "HTTP endpoints"). Beyond max_connections idle keep-alive
    # connections are closed to make room, then new ones get 503; lowered at start to fit RLIMIT_NOFILE.
    max_connections: int = Field(512, ge=8, le=65536)
    workers: int = Field(4, ge=1, le=64)  # threads running handlers (/metrics rendering, control endpoints)
    read_timeout_seconds: float = Field(10.0, gt=0, le=300)  # a request in progress, first byte to last
    idle_timeout_seconds: float = Field(90.0, gt=0, le=3600)  # keep-alive with no request in progress
    write_timeout_seconds: float = Field(10.0, gt=0, le=300)  # a client that does not read its answer
    # exporter-toolkit web configuration (TLS, basic auth, headers), the file node_exporter's
    # --web.config.file takes; re-read when it changes. null = plain HTTP, no basic auth.
    web_config_file: Path | None = None


# ------------------------------------------------------------------------------------------------ sampling


class NvmlConfig(_Section):
    enabled: bool = True
    interval_seconds: float = Field(1.0, gt=0)
    # PCIe throughput blocks ~20 ms per call per GPU: its own slow job; 0 turns it off.
    slow_interval_seconds: float = Field(10.0, ge=0)
    processes: bool = True
    # GPM (Hopper+): SM/tensor/DRAM activity and NVLink rates; adds 1-6 ms per GPU to each fast sample.
    gpm: bool = True

    @field_validator("slow_interval_seconds")
    @classmethod
    def _slow(cls, v: float) -> float:
        if 0 < v < 10:
            raise ValueError("must be 0 (off) or >= 10 seconds: each PCIe throughput call blocks ~20 ms")
        return v


class HostConfig(_Section):
    enabled: bool = True
    interval_seconds: float = Field(1.0, gt=0)
    per_cpu: bool = True


class DiskConfig(_Section):
    enabled: bool = True
    interval_seconds: float = Field(1.0, gt=0)
    # Regular expression over device names to skip: virtual devices, and partitions (their I/O is already
    # counted on the whole disk, so summing over devices would count it twice).
    exclude_devices: str = r"^(loop|ram|zram|sr|fd)\d*$|^(sd[a-z]+|vd[a-z]+|xvd[a-z]+)\d+$|^nvme\d+n\d+p\d+$"
    # Filesystems whose free space is reported (the model directory's filesystem belongs here).
    paths: list[Path] = Field(default_factory=list)


class NetworkConfig(_Section):
    enabled: bool = True
    interval_seconds: float = Field(1.0, gt=0)
    exclude_interfaces: str = r"^(lo|veth.*|docker\d*|br-.*)$"


class ProcessConfig(_Section):
    enabled: bool = True
    interval_seconds: float = Field(1.0, gt=0)
    # PID of the watched workload; null = none for `zmon watch`, zmon's own process for `zmon run`.
    pid: int | None = Field(None, gt=0)


class AllocatorConfig(_Section):
    """torch caching-allocator statistics, in-process only (`zmon run`, `zmon.attach`)."""

    enabled: bool = True
    interval_seconds: float = Field(1.0, gt=0)  # memory_stats costs ~0.1 ms and does not synchronize


class SamplingConfig(_Section):
    misfire_grace_seconds: float = Field(1.0, gt=0)
    max_backoff_seconds: float = Field(60.0, gt=0)
    nvml: NvmlConfig = NvmlConfig()
    host: HostConfig = HostConfig()
    disk: DiskConfig = DiskConfig()
    network: NetworkConfig = NetworkConfig()
    process: ProcessConfig = ProcessConfig()
    allocator: AllocatorConfig = AllocatorConfig()


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"
    # `zmon run`: one status line (generations, failures, images/s, p50 latency, policy actions) this often;
    # 0 = none.
    status_interval_seconds: float = Field(30.0, ge=0)


# Values of the `model:` speed options, known without importing torch or diffusers (what *runs* on a device is
# probed when the option is applied, zmon.workload.options). diffusers' attention dispatcher backends
# (diffusers.models.attention_dispatch.AttentionBackendName, 0.36–0.42); one the installed diffusers lacks is
# reported when it is applied, not here.
ATTENTION_BACKENDS: tuple[str, ...] = (
    "native",
    "_native_cudnn",
    "_native_efficient",
    "_native_flash",
    "_native_math",
    "_native_npu",
    "_native_xla",
    "flex",
    "flash",
    "flash_varlen",
    "flash_hub",
    "flash_varlen_hub",
    "flash_4_hub",
    "_flash_3",
    "_flash_varlen_3",
    "_flash_3_hub",
    "_flash_3_varlen_hub",
    "aiter_fa2_hub",
    "sage",
    "sage_hub",
    "sage_blackwell_hub",
    "sage_varlen",
    "_sage_qk_int8_pv_fp8_cuda",
    "_sage_qk_int8_pv_fp8_cuda_sm90",
    "_sage_qk_int8_pv_fp16_cuda",
    "_sage_qk_int8_pv_fp16_triton",
    "xformers",
)
# torch.compile modes (null = "default"). reduce-overhead and max-autotune capture CUDA graphs.
COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def alloc_conf_problem(value: str) -> str | None:
    """Why a PYTORCH_CUDA_ALLOC_CONF string is unusable, or None. Items are 'key:value' separated by commas.

    expandable_segments together with max_split_size_mb is refused: the maintainers advise against the
    combination (splitting limits are meaningless for expandable segments).
    """
    items = [i.strip() for i in value.split(",") if i.strip()]
    if not items:
        return "empty; use null for the default allocator"
    keys: dict[str, str] = {}
    for item in items:
        key, sep, val = item.partition(":")
        if not sep or not key.strip() or not val.strip():
            return f"{item!r} is not key:value (e.g. expandable_segments:True)"
        keys[key.strip()] = val.strip()
    if keys.get("expandable_segments", "").lower() in ("true", "1") and "max_split_size_mb" in keys:
        return "expandable_segments and max_split_size_mb must not be combined"
    return None


_CPU_WORKERS_RE = re.compile(r"^cpu:(\d+)$")
_CUDA_DEVICE_RE = re.compile(r"^cuda:(\d+)$")
MAX_WORKERS = 64


class WorkersConfig(_Section):
    """How `zmon run` / `zmon profile` supervise one worker process per device (owned by zmon.app.workers)."""

    # A worker must have loaded its pipeline within this long after it started.
    start_timeout_seconds: float = Field(600.0, gt=0)
    # A worker that shows no progress (a denoise step, a generation boundary, or an idle tick) for this long
    # is hung: it is killed and restarted. Above the longest step, torch.compile's first one included.
    heartbeat_timeout_seconds: float = Field(300.0, gt=0)
    # Restarts of one worker in a row (a worker that completes a generation starts counting again from 0)
    # before it is given up; the run goes on with the others, and fails when every worker is given up.
    max_restarts: int = Field(5, ge=0)
    restart_backoff_seconds: float = Field(1.0, gt=0)  # first delay before a restart; doubles each time
    max_restart_backoff_seconds: float = Field(60.0, gt=0)
    # On SIGTERM each worker finishes its current generation; one still busy after this long is killed.
    drain_timeout_seconds: float = Field(600.0, gt=0)


class ModelConfig(_Section):
    """Which pipeline `zmon run` / `zmon profile` load (owned by zmon.workload.loading)."""

    # Hub id or local directory; "builtin:tiny-z-image" is the embedded random-weight Z-Image (no download).
    # Real users: "Tongyi-MAI/Z-Image-Turbo".
    id: str = "builtin:tiny-z-image"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: cuda if available, else cpu; or "cpu", "cuda", "cuda:1"
    variant: str | None = None
    pipeline_class: str | None = None  # override auto-detection, e.g. "ZImageImg2ImgPipeline"
    compile: bool = False  # torch.compile the denoiser (transformer/unet)
    compile_mode: str | None = None  # null = torch's default; reduce-overhead / max-autotune capture CUDA graphs
    # Speed options `zmon tune` measures (applied by zmon.workload.options.apply_model_options at load time).
    compile_vae: bool = False  # torch.compile the VAE decoder (vae.decoder)
    attention_backend: str | None = None  # diffusers attention dispatcher backend; null = diffusers' default
    channels_last_vae: bool = False  # VAE weights and activations in channels_last memory format
    fp8: bool = False  # torchao float8 dynamic quantization of the denoiser's linear layers (lossy; CUDA cc >= 8.9)
    # Exported as PYTORCH_CUDA_ALLOC_CONF before torch initialises CUDA, e.g. "expandable_segments:True".
    alloc_conf: str | None = None
    cache_dir: Path = Path("~/.cache/zmon")  # where the embedded model is written once
    local_files_only: bool = False
    # torch intra-op threads (CPU work: text encoder offloaded to CPU, the embedded model); null = torch's
    # default (one per core). On a small busy host, 1 avoids oversubscription (measured 20x on 2 loaded cores).
    cpu_threads: int | None = Field(None, gt=0)
    # Data-parallel serving: one worker process per device, each with its own pipeline and a round-robin share
    # of the workload; metrics merged into one /metrics. null = one process on `device` (no workers).
    # [0, 1, ...] = those CUDA devices; "auto" = every visible CUDA device; "cpu:N" = N workers on the CPU.
    devices: tuple[int, ...] | str | None = None
    workers: WorkersConfig = WorkersConfig()

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, v: Any) -> Any:
        if v is None:
            return None
        if isinstance(v, str):
            text = v.strip().lower()
            if text == "auto":
                return "auto"
            m = _CPU_WORKERS_RE.match(text)
            if m:
                n = int(m.group(1))
                if not 1 <= n <= MAX_WORKERS:
                    raise ValueError(f"cpu:N needs 1 <= N <= {MAX_WORKERS}, got {n}")
                return f"cpu:{n}"
            raise ValueError(f'expected a list of CUDA device indices, "auto" or "cpu:N", got {v!r}')
        if isinstance(v, (list, tuple)):
            out: list[int] = []
            for item in v:
                if isinstance(item, bool):
                    raise ValueError(f"device {item!r} is not a CUDA device index")
                if isinstance(item, str) and (m := _CUDA_DEVICE_RE.match(item.strip().lower())):
                    item = int(m.group(1))
                if not isinstance(item, int) or item < 0:
                    raise ValueError(f'device {item!r} is not a CUDA device index (0, 1, ... or "cuda:N")')
                out.append(item)
            if not out:
                raise ValueError("an empty list: leave devices null for one process, or name the devices")
            if len(set(out)) != len(out):
                raise ValueError(f"device listed twice: {list(v)}")
            if len(out) > MAX_WORKERS:
                raise ValueError(f"at most {MAX_WORKERS} devices")
            return tuple(out)
        raise ValueError(f'expected a list of CUDA device indices, "auto" or "cpu:N", got {v!r}')

    @model_validator(mode="after")
    def _one_placement(self) -> ModelConfig:
        if self.devices is not None and self.device != "auto":
            raise ValueError(
                f"set model.device ({self.device!r}) or model.devices ({self.devices!r}), not both: with devices, "
                "each worker runs on its own device"
            )
        return self

    @field_validator("compile_mode")
    @classmethod
    def _check_compile_mode(cls, v: str | None) -> str | None:
        if v is not None and v not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {v!r}; valid: {', '.join(COMPILE_MODES)}")
        return v

    @field_validator("attention_backend")
    @classmethod
    def _check_attention_backend(cls, v: str | None) -> str | None:
        if v is not None and v not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {v!r}; valid: {', '.join(ATTENTION_BACKENDS)}")
        return v

    @field_validator("alloc_conf")
    @classmethod
    def _check_alloc_conf(cls, v: str | None) -> str | None:
        problem = None if v is None else alloc_conf_problem(v)
        if problem:
            raise ValueError(problem)
        return v


class PromptCacheConfig(_Section):
    enabled: bool = False
    max_entries: int = Field(256, gt=0)


class JsonlConfig(_Section):
    path: Path | None = None  # per-generation log; null = off
    max_bytes: int = Field(50 * 1024 * 1024, gt=0)
    backups: int = Field(5, ge=0)


class OomConfig(_Section):
    """What `zmon run` does when a generation raises CUDA out of memory (owned by zmon.workload.oom)."""

    # Release the allocator's cache (empty_cache, counted as a remediation action) and run the generation
    # again, once; false: count it and go on with the next generation.
    retry: bool = True
    # Record the allocator's history (torch.cuda.memory._record_memory_history, Python stacks) and dump a
    # snapshot oom-<unix>-<generation>.pickle here at each OOM (view at https://pytorch.org/memory_viz).
    # Recording costs CPU time on every allocation; null = off. CUDA only.
    memory_snapshot_dir: Path | None = None
    max_snapshots: int = Field(5, gt=0)  # at most this many oom-*.pickle files in the directory
    max_entries: int = Field(100_000, gt=0)  # allocation events kept in the recorded history


class WorkloadConfig(_Section):
    """What `zmon run` generates (owned by zmon.workload)."""

    prompts_file: Path | None = None  # one prompt per line; null = built-in list
    resolutions: list[str] = Field(default_factory=list)  # "WIDTHxHEIGHT"; empty = the model's default
    steps: int | None = None  # null = the model's default (Z-Image-Turbo: 9 = 8 DiT forwards)
    guidance_scale: float | None = None  # null = the model's default (Z-Image-Turbo: 0.0)
    batch_size: int = Field(1, gt=0)
    seed: int | None = 0
    init_images: list[Path] = Field(default_factory=list)  # non-empty = img2img
    strength: float = Field(0.6, gt=0, le=1)
    max_generations: int | None = Field(None, gt=0)  # null = forever
    rate_per_second: float | None = Field(None, gt=0)  # null = back to back
    output_dir: Path | None = None
    prompt_cache: PromptCacheConfig = PromptCacheConfig()
    jsonl: JsonlConfig = JsonlConfig()
    oom: OomConfig = OomConfig()


# ------------------------------------------------------------------------------------------------ profiling

ReportFormat = Literal["json", "md", "html"]
CACHE_RULE = "reserved_unallocated_high"  # the policy rule on the cache ratio, shared with the diagnosis


class Thresholds(_Section):
    """Where each diagnosis rule fires; ratios are 0..1, throughputs bytes/s, times seconds.

    Each threshold compares one figure of zmon.rules.FIGURES (`CONDITIONS`: field → figure, operator) with
    the same comparator the policy uses. Defaults follow the source article (80% GPU util, 90% VRAM,
    500 MB/s, 3× first generation) and zmon's own calibration where the article gives no number (step and
    run CV). The reserved-unallocated ratio has no knob here: it is `policy.rules.reserved_unallocated_high`.
    """

    gpu_util_low: float = Field(0.80, ge=0, le=1)  # GPU util during diffusion below this → CPU-bound
    vram_high: float = Field(0.90, ge=0, le=1)  # peak VRAM in use / card above this → memory-bound
    step_cv_high: float = Field(0.15, ge=0)  # within-generation CV of step times above this → kernel issue
    # Steps shorter than this are not judged for unevenness: thread scheduling noise is a few milliseconds.
    min_step_seconds: float = Field(0.02, ge=0)
    run_cv_high: float = Field(0.10, ge=0)  # run-to-run CV above this → I/O or caching
    read_throughput_low: float = Field(500e6, gt=0)  # bytes/s; model reads slower than this → I/O-bound
    min_checkpoint_bytes: float = Field(1e9, ge=0)  # smaller checkpoints: read throughput shown, not judged
    checkpoint_load_high: float = Field(10.0, gt=0)  # seconds; loading longer than this → I/O-bound
    first_gen_slowdown_high: float = Field(3.0, gt=1)  # first generation / steady-state median
    text_encode_share_high: float = Field(0.25, ge=0, le=1)  # share of a generation (CPU-bound hint)
    postprocess_share_high: float = Field(0.15, ge=0, le=1)  # output processing share (CPU-bound hint)
    cpu_busy_high: float = Field(0.9, ge=0)  # process cores busy at or above this = saturated
    fragmentation_high: float = Field(0.30, ge=0, le=1)  # inactive_split / reserved
    latency_trend_high: float = Field(1.2, gt=1)  # late-run median / early-run median (slowing down)
    nccl_share_high: float = Field(0.2, ge=0, le=1)  # share of time in NCCL collectives
    scaling_efficiency_low: float = Field(0.75, gt=0, le=1)  # multi-GPU speedup / GPU count
    untimed_share_high: float = Field(0.10, ge=0, le=1)  # generation time outside every timed stage
    headroom_low: float = Field(0.10, ge=0, le=1)  # (device free + allocator cache) / card below this = pressure
    io_read_rate_high: float = Field(100e6, gt=0)  # bytes/s read from storage during generations = I/O-bound
    outlier_ratio_high: float = Field(3.0, gt=1)  # a run over this × the median is an outlier (left out)

    # field → (figure of zmon.rules.FIGURES, operator under which the finding fires)
    CONDITIONS: ClassVar[dict[str, tuple[str, Op]]] = {
        "gpu_util_low": ("gpu_utilization_ratio", "<"),
        "vram_high": ("gpu_memory_used_ratio", ">"),
        "step_cv_high": ("denoise_step_cv", ">"),
        "min_step_seconds": ("denoise_step_seconds", ">="),
        "run_cv_high": ("run_time_cv", ">"),
        "read_throughput_low": ("checkpoint_read_bytes_per_second", "<"),
        "min_checkpoint_bytes": ("checkpoint_bytes", ">="),
        "checkpoint_load_high": ("checkpoint_load_seconds", ">"),
        "first_gen_slowdown_high": ("first_generation_slowdown_ratio", ">"),
        "text_encode_share_high": ("text_encode_share_ratio", ">"),
        "postprocess_share_high": ("postprocess_share_ratio", ">"),
        "cpu_busy_high": ("process_cpu_cores", ">="),
        "fragmentation_high": ("torch_fragmentation_ratio", ">"),
        "latency_trend_high": ("latency_trend_ratio", ">"),
        "nccl_share_high": ("nccl_time_share_ratio", ">"),
        "scaling_efficiency_low": ("scaling_efficiency_ratio", "<"),
        "untimed_share_high": ("untimed_share_ratio", ">"),
        "headroom_low": ("torch_headroom_ratio", "<"),
        "io_read_rate_high": ("generation_read_bytes_per_second", ">="),
        "outlier_ratio_high": ("run_time_outlier_ratio", ">"),
    }

    # The reserved-unallocated (cache) ratio is judged against the policy rule of the same name: one knob.
    _cache_ratio_high: float | None = PrivateAttr(default=None)

    @property
    def cache_ratio_high(self) -> float:
        """policy.rules.reserved_unallocated_high.threshold (its default until `with_policy` is applied)."""
        if self._cache_ratio_high is not None:
            return self._cache_ratio_high
        return next(r.threshold for r in default_rules() if r.name == CACHE_RULE)

    def with_policy(self, policy: PolicyConfig) -> Thresholds:
        """These thresholds with the ones that live in policy rules (the cache ratio) taken from `policy`."""
        out = self.model_copy()
        out._cache_ratio_high = policy.rule_threshold(CACHE_RULE)
        return out

    def condition(self, key: str) -> tuple[str, Op, float]:
        """(figure, operator, threshold) of one threshold."""
        figure, op = self.CONDITIONS[key]
        return figure, op, float(getattr(self, key))

    def check(self, key: str, value: float | None) -> bool | None:
        """Whether `value` crosses threshold `key` (None when the value is unknown)."""
        _, op, threshold = self.condition(key)
        return compare(value, op, threshold)


class TraceConfig(_Section):
    """The daemon's on-demand trace endpoint (POST /trace, authenticated); off unless enabled."""

    enabled: bool = False
    directory: Path = Path("zmon-traces")  # where trace-<time>.json files are written
    max_generations: int = Field(20, gt=0)  # the most generations one request may capture


class ProfilingConfig(_Section):
    """`zmon profile` defaults and the diagnosis thresholds."""

    runs: int = Field(20, gt=0)  # baseline generations after warm-up (the article's 20)
    warmup: int = Field(1, ge=0)  # generations run first and left out of the baseline
    # NVML util+memory and psutil reads during the profile. NVML's own averaging period is 1/6 s to 1 s,
    # so faster sampling repeats values; 0.1 s resolves a 150 ms denoise step.
    sample_interval_seconds: float = Field(0.1, gt=0)
    # Sequential read/write test in the model directory (0 = skip the disk test).
    disk_test_bytes: int = Field(256 * 1024 * 1024, ge=0)
    output_dir: Path = Path("zmon-profile")
    formats: tuple[ReportFormat, ...] = ("json", "md", "html")
    thresholds: Thresholds = Thresholds()
    trace: TraceConfig = TraceConfig()


# ------------------------------------------------------------------------------------------------ policy

_UNSET = object()


def _jsonish(v: Any) -> Any:
    """A YAML value as model_dump(mode="json") shows it (tuples as lists, ints where floats are kept)."""
    if isinstance(v, tuple):
        return [_jsonish(x) for x in v]
    if isinstance(v, list):
        return [_jsonish(x) for x in v]
    return v


def _default_rule_dicts() -> dict[str, dict[str, Any]]:
    return {r.name: r.model_dump(exclude_defaults=True) for r in default_rules()}


def merge_rules(value: Any) -> Any:
    """`policy.rules` as written → every rule by name, the user's keys merged over the defaults.

    The mapping form (`policy.rules.<name>.<key>`) changes one key of a default rule, adds a rule under a new
    name (a full definition), or removes a default with `enabled: false`. The older list form replaced the
    defaults: it is still accepted, with a note that shows the equivalent mapping. When a default rule's
    `threshold` is changed without `clear`, `clear` keeps the default hysteresis gap.
    """
    defaults = _default_rule_dicts()
    if value is None:
        return defaults
    if isinstance(value, (list, tuple)):
        listed: dict[str, Any] = {}
        for item in value:
            if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
                return value  # let validation report the malformed item where it is
            listed[item["name"]] = {k: v for k, v in item.items() if k != "name"}
        mapping: dict[str, Any] = dict(listed)
        for name in defaults:
            if name not in mapping:
                mapping[name] = {"enabled": False}
        full = {r.name: r.model_dump(mode="json") for r in default_rules()}
        shown_rules = {
            name: {k: v for k, v in over.items() if full.get(name, {}).get(k, _UNSET) != _jsonish(v)}
            for name, over in mapping.items()
        }
        shown = yaml.safe_dump({"policy": {"rules": shown_rules}}, sort_keys=False).rstrip()
        _note(
            "policy.rules: the list form is deprecated (it replaces every default rule); it is read as the "
            f"mapping below. Write the rules keyed by name, only the keys you change:\n{shown}"
        )
        value = mapping
    if not isinstance(value, Mapping):
        return value  # validation says what is wrong
    merged: dict[str, Any] = {}
    for name, base in defaults.items():
        over = value.get(name)
        if over is None:
            merged[name] = {"name": name, **base}
            continue
        if not isinstance(over, Mapping):
            merged[name] = over
            continue
        rule = {"name": name, **base, **over}
        if "threshold" in over and "clear" not in over and "clear" in base:
            with contextlib.suppress(TypeError, ValueError):  # an invalid threshold: validation reports it
                rule["clear"] = round(float(base["clear"]) + float(over["threshold"]) - float(base["threshold"]), 12)
        merged[name] = rule
    for name, over in value.items():
        if name not in defaults:
            merged[name] = {"name": name, **over} if isinstance(over, Mapping) else over
    return merged


class PolicyConfig(_Section):
    """Rules over sampled figures → actions at safe points (empty_cache, gc_collect) and alerts."""

    enabled: bool = True
    # Decisions are logged and counted with result="dry_run" but no remedial action runs;
    # alerts are still sent.
    dry_run: bool = False
    # Call empty_cache after every N-th generation (a safe point) regardless of rules; null = off.
    periodic_empty_cache_generations: int | None = Field(None, gt=0)
    # Keyed by rule name and merged over the defaults (see merge_rules): change one key with one line.
    rules: dict[str, Rule] = Field(default_factory=lambda: {r.name: r for r in default_rules()})

    @field_validator("rules", mode="before")
    @classmethod
    def _merge(cls, v: Any) -> Any:
        return merge_rules(v)

    @field_validator("rules")
    @classmethod
    def _names(cls, v: dict[str, Rule]) -> dict[str, Rule]:
        bad = [f"{key} (name {r.name!r})" for key, r in v.items() if r.name != key]
        if bad:
            raise ValueError(f"a rule's name is its key; these differ: {', '.join(bad)}")
        return v

    @property
    def active_rules(self) -> tuple[Rule, ...]:
        """The rules that are evaluated (enabled), in definition order."""
        return tuple(r for r in self.rules.values() if r.enabled)

    def rule_threshold(self, name: str) -> float | None:
        """The threshold of a rule (enabled or not); None when no rule has that name."""
        r = self.rules.get(name)
        return None if r is None else r.threshold


# ------------------------------------------------------------------------------------------------ alerting

_LABEL_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


class BasicAuthConfig(_Section):
    username: str
    password_file: Path  # read at each send, so a rotated secret is picked up


class AlertingConfig(_Section):
    """Alertmanager v2 client. No URLs = alerting off (alert actions are then only logged and counted)."""

    alertmanager_urls: tuple[str, ...] = ()  # e.g. ["http://127.0.0.1:9093"]; each gets every alert
    # Active alerts are re-sent this often: Alertmanager expires an alert without endsAt after its
    # resolve_timeout (default 5m).
    resend_seconds: float = Field(60.0, gt=0)
    timeout_seconds: float = Field(5.0, gt=0)  # per HTTP request
    retries: int = Field(3, ge=0)  # extra attempts per delivery on network errors, 5xx and 429
    backoff_seconds: float = Field(0.5, gt=0)  # first retry delay; doubles per attempt
    max_backoff_seconds: float = Field(8.0, gt=0)
    queue_size: int = Field(1000, gt=0)  # pending deliveries per URL; the oldest is dropped (and counted)
    basic_auth: BasicAuthConfig | None = None
    bearer_token_file: Path | None = None
    ca_file: Path | None = None  # CA bundle for https URLs (default: the system store)
    # runbook_url = this + alertname in lower case. null: the runbooks this zmon serves itself,
    # http://<server.listen>/runbooks#runbook- (set it where people reach zmon, or to your own copy).
    runbook_base_url: str | None = None
    instance: str | None = None  # label `instance`; null = this host's name
    external_labels: dict[str, str] = Field(default_factory=dict)  # added to every alert (e.g. cluster)

    @field_validator("alertmanager_urls")
    @classmethod
    def _urls(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for u in v:
            parts = urlsplit(u)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"{u!r} is not an http(s) URL")
        return v

    @field_validator("external_labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if not _LABEL_NAME_RE.match(k) or k.startswith("__")]
        if bad:
            raise ValueError(f"invalid label names: {', '.join(sorted(bad))}")
        return v

    @model_validator(mode="after")
    def _one_auth(self) -> AlertingConfig:
        if self.basic_auth is not None and self.bearer_token_file is not None:
            raise ValueError("set basic_auth or bearer_token_file, not both")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.alertmanager_urls)


# ------------------------------------------------------------------------------------------------ the whole


class Config(_Section):
    server: ServerConfig = ServerConfig()
    sampling: SamplingConfig = SamplingConfig()
    logging: LoggingConfig = LoggingConfig()
    model: ModelConfig = ModelConfig()
    workload: WorkloadConfig = WorkloadConfig()
    profiling: ProfilingConfig = ProfilingConfig()
    policy: PolicyConfig = PolicyConfig()
    alerting: AlertingConfig = AlertingConfig()

    @property
    def diagnosis_thresholds(self) -> Thresholds:
        """profiling.thresholds plus the thresholds the diagnosis shares with policy rules."""
        return self.profiling.thresholds.with_policy(self.policy)

    _notes: list[str] = PrivateAttr(default_factory=list)

    @property
    def notes(self) -> tuple[str, ...]:
        """Deprecations and migrations applied while loading (shown by the CLI as warnings)."""
        return tuple(self._notes)

    @model_validator(mode="before")
    @classmethod
    def _migrate(cls, data: Any) -> Any:
        """Keys that moved: still read, each with a note saying where it lives now."""
        if not isinstance(data, Mapping):
            return data
        profiling = data.get("profiling")
        thresholds = profiling.get("thresholds") if isinstance(profiling, Mapping) else None
        if isinstance(thresholds, Mapping) and "reserved_unallocated_high" in thresholds:
            assert isinstance(profiling, Mapping)
            value = thresholds["reserved_unallocated_high"]
            data = dict(data)
            moved = {k: v for k, v in thresholds.items() if k != "reserved_unallocated_high"}
            data["profiling"] = {**profiling, "thresholds": moved}
            policy = dict(data.get("policy") or {})
            rules = policy.get("rules")
            if rules is None or isinstance(rules, Mapping):
                rules = dict(rules or {})
                rule = dict(rules.get("reserved_unallocated_high") or {})
                rule.setdefault("threshold", value)
                rules["reserved_unallocated_high"] = rule
                policy["rules"] = rules
                data["policy"] = policy
            _note(
                "profiling.thresholds.reserved_unallocated_high moved to "
                "policy.rules.reserved_unallocated_high.threshold (one threshold for the alert and the "
                f"diagnosis); read as threshold {value!r}"
            )
        return data


def _format_errors(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        out.append(f"{path}: {msg}")
    return out


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """ZMON_SAMPLING__NVML__INTERVAL_SECONDS=2 → {'sampling': {'nvml': {'interval_seconds': 2}}}.

    Values are parsed as YAML scalars so numbers and booleans keep their type. ZMON_AUTH_TOKEN and other
    single-segment names that are not config sections are ignored.
    """
    tree: dict[str, Any] = {}
    sections = set(Config.model_fields)
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        parts = key[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) < 2 or parts[0] not in sections:
            continue
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError:
            node[parts[-1]] = raw
    return tree


def deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read YAML (optional), apply ZMON_ environment then CLI overrides, validate; raise ConfigError."""
    source = str(path) if path else "config"
    data: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError([f"cannot read: {e.strerror or e}"], source) from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"invalid YAML: {e}"], source) from None
        if not isinstance(data, dict):
            raise ConfigError([f"(top level): expected a mapping, got {type(data).__name__}"], source)
    data = deep_merge(data, env_overrides(os.environ if environ is None else environ))
    if overrides:
        data = deep_merge(data, overrides)
    with _collect_notes() as notes:
        try:
            cfg = Config.model_validate(data)
        except ValidationError as e:
            raise ConfigError(_format_errors(e), source) from None
    cfg._notes.extend(notes)
    return cfg
