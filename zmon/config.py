"""YAML → validated, frozen configuration; every error reported at once; ZMON_ env and CLI overrides.

Every section of the configuration is defined here, in the order of the YAML file (config.example.yaml
documents each key). The policy's rule model and the figure names rules compare come from `zmon.rules`.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import os
import re
import types
import typing
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
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
# ZMON_* variables that are not configuration keys, and who reads them. Any other ZMON_* name that does not
# name a configuration key is an error (a typo such as ZMON_SAMPLING_NVML_INTERVAL_SECONDS, with one
# underscore, would otherwise be ignored without a word). The variable named by server.auth.token_env is
# allowed too, whatever its name.
NON_CONFIG_ENV: Mapping[str, str] = {
    "ZMON_AUTH_TOKEN": "the control-endpoint token (server.auth.token_env's default)",
    "ZMON_ARGS": "extra command-line arguments in deploy/systemd/zmon.service",
    "ZMON_WORKLOAD_CMDLINE": "the watched service's command line in deploy/kubernetes/deployment.yaml",
    "ZMON_TORCH_VERSION": "the torch version scripts/setup installs",
    "ZMON_TORCH_INDEX_URL": "the package index scripts/setup takes torch from",
    "ZMON_GPU_CACHE": "the cache directory of benchmarks/gpu_profile.sh",
    "ZMON_FAULTS_HEAVY": "the heavy cases of the fault-injection tests (tests/e2e/test_faults_*.py)",
}

# Bounds of what a configuration may say, so that every value check-config accepts also starts: APScheduler
# computes dates with datetime + timedelta (an interval of 1e12 s overflows), threading waits reject timeouts
# above threading.TIMEOUT_MAX (~292 years), and nobody means a sampling interval of a week.
MIN_INTERVAL_SECONDS = 0.01  # a sampling job every 10 ms is already more than NVML can refresh
MAX_INTERVAL_SECONDS = 3600.0  # a sample older than an hour is not monitoring
MAX_WAIT_SECONDS = 7 * 86400.0  # cooldowns, hold times, backoffs
MAX_PID = 4_194_304  # PID_MAX_LIMIT on 64-bit Linux
MAX_YAML_DEPTH = 64  # nesting levels; zmon's deepest key is 5 levels down
MAX_YAML_NODES = 100_000  # values after aliases are expanded (a "billion laughs" file stops here)
MAX_CONFIG_BYTES = 16 * 1024 * 1024  # a configuration file larger than this is not one (e.g. /dev/zero)


class ConfigError(Exception):
    """Raised with every problem found in a configuration, each as 'path: message'."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: {len(problems)} error(s)\n" + "\n".join(f"  - {p}" for p in problems))


class _Section(BaseModel):
    # Not a number and infinity are never meaningful settings (`interval_seconds: .inf` used to pass
    # validation and crash the scheduler at start).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _user_path(p: Path) -> Path:
    """A path as written (`~` kept, expanded where it is used), checked so that expanding it cannot fail."""
    text = str(p)
    if "\0" in text:
        raise ValueError("contains a NUL byte")
    if text.startswith("~"):
        try:
            p.expanduser()
        except RuntimeError:
            user = text[1:].split("/", 1)[0]
            raise ValueError(
                f"{text!r}: no user named {user!r} on this host (~{user} cannot be expanded)"
                if user
                else f"{text!r}: the home directory is unknown ($HOME unset and no passwd entry)"
            ) from None
    return p


UserPath = Annotated[Path, AfterValidator(_user_path)]


def _regex(value: str) -> str:
    try:
        with warnings.catch_warnings():  # "possible nested set" and the like: Python's notes, not the user's error
            warnings.simplefilter("ignore")
            re.compile(value)
    except re.error as e:
        raise ValueError(f"not a valid regular expression: {e}") from None
    return value


Regex = Annotated[str, AfterValidator(_regex)]
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _env_name(value: str) -> str:
    if not _ENV_NAME_RE.match(value):
        raise ValueError(f"{value!r} is not an environment variable name (letters, digits, _)")
    return value


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

    token_file: UserPath | None = None
    token_env: Annotated[str, AfterValidator(_env_name)] = "ZMON_AUTH_TOKEN"

    def token(self) -> str | None:
        if self.token_file is not None:
            return self.token_file.expanduser().read_text().strip() or None
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
    web_config_file: UserPath | None = None


# ------------------------------------------------------------------------------------------------ sampling


Interval = Annotated[float, Field(ge=MIN_INTERVAL_SECONDS, le=MAX_INTERVAL_SECONDS)]


class NvmlConfig(_Section):
    enabled: bool = True
    interval_seconds: Interval = 1.0
    # PCIe throughput blocks ~20 ms per call per GPU: its own slow job; 0 turns it off.
    slow_interval_seconds: float = Field(10.0, ge=0, le=MAX_INTERVAL_SECONDS)
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
    interval_seconds: Interval = 1.0
    per_cpu: bool = True


class DiskConfig(_Section):
    enabled: bool = True
    interval_seconds: Interval = 1.0
    # Regular expression over device names to skip: virtual devices, and partitions (their I/O is already
    # counted on the whole disk, so summing over devices would count it twice).
    exclude_devices: Regex = r"^(loop|ram|zram|sr|fd)\d*$|^(sd[a-z]+|vd[a-z]+|xvd[a-z]+)\d+$|^nvme\d+n\d+p\d+$"
    # Filesystems whose free space is reported (the model directory's filesystem belongs here).
    paths: list[UserPath] = Field(default_factory=list, max_length=256)


class NetworkConfig(_Section):
    enabled: bool = True
    interval_seconds: Interval = 1.0
    exclude_interfaces: Regex = r"^(lo|veth.*|docker\d*|br-.*)$"


class ProcessConfig(_Section):
    enabled: bool = True
    interval_seconds: Interval = 1.0
    # PID of the watched workload; null = none for `zmon watch`, zmon's own process for `zmon run`.
    pid: int | None = Field(None, gt=0, le=MAX_PID)


class AllocatorConfig(_Section):
    """torch caching-allocator statistics, in-process only (`zmon run`, `zmon.attach`)."""

    enabled: bool = True
    interval_seconds: Interval = 1.0  # memory_stats costs ~0.1 ms and does not synchronize


class SamplingConfig(_Section):
    # A job that starts later than this is skipped (coalesced into the next). Applied per job as at most that
    # job's interval (a run later than one interval is the next run anyway), and at least 1 s (APScheduler
    # takes whole seconds).
    misfire_grace_seconds: float = Field(1.0, gt=0, le=MAX_INTERVAL_SECONDS)
    max_backoff_seconds: float = Field(60.0, gt=0, le=86400)
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
    """How `zmon run` / `zmon profile` supervise one worker process per device (owned by zmon.app.workers.parent)."""

    # A worker must have loaded its pipeline within this long after it started.
    start_timeout_seconds: float = Field(600.0, gt=0, le=86400)
    # A worker that shows no progress (a denoise step, a generation boundary, or an idle tick) for this long
    # is hung: it is killed and restarted. Above the longest step, torch.compile's first one included.
    heartbeat_timeout_seconds: float = Field(300.0, gt=0, le=86400)
    # Restarts of one worker in a row (a worker that completes a generation starts counting again from 0)
    # before it is given up; the run goes on with the others, and fails when every worker is given up.
    max_restarts: int = Field(5, ge=0, le=10000)
    restart_backoff_seconds: float = Field(1.0, gt=0, le=3600)  # first delay before a restart; doubles each time
    max_restart_backoff_seconds: float = Field(60.0, gt=0, le=86400)
    # On SIGTERM each worker finishes its current generation; one still busy after this long is killed.
    drain_timeout_seconds: float = Field(600.0, gt=0, le=86400)


class ModelConfig(_Section):
    """Which pipeline `zmon run` / `zmon profile` load (owned by zmon.workload.loading)."""

    # Hub id or local directory; "builtin:tiny-z-image" is the embedded random-weight Z-Image (no download).
    # Real users: "Tongyi-MAI/Z-Image-Turbo".
    id: str = Field("builtin:tiny-z-image", min_length=1)
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
    cache_dir: UserPath = Path("~/.cache/zmon")  # where the embedded model is written once
    local_files_only: bool = False
    # torch intra-op threads (CPU work: text encoder offloaded to CPU, the embedded model); null = torch's
    # default (one per core). On a small busy host, 1 avoids oversubscription (measured 20x on 2 loaded cores).
    cpu_threads: int | None = Field(None, gt=0, le=4096)
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
    max_entries: int = Field(256, gt=0, le=1_000_000)


class JsonlConfig(_Section):
    path: UserPath | None = None  # per-generation log; null = off
    max_bytes: int = Field(50 * 1024 * 1024, ge=4096, le=1 << 40)  # at least a few lines per file
    backups: int = Field(5, ge=0, le=1000)


class OomConfig(_Section):
    """What `zmon run` does when a generation raises CUDA out of memory (owned by zmon.workload.oom)."""

    # Release the allocator's cache (empty_cache, counted as a remediation action) and run the generation
    # again, once; false: count it and go on with the next generation.
    retry: bool = True
    # Record the allocator's history (torch.cuda.memory._record_memory_history, Python stacks) and dump a
    # snapshot oom-<unix>-<generation>.pickle here at each OOM (view at https://pytorch.org/memory_viz).
    # Recording costs CPU time on every allocation; null = off. CUDA only.
    memory_snapshot_dir: UserPath | None = None
    max_snapshots: int = Field(5, gt=0, le=10_000)  # at most this many oom-*.pickle files in the directory
    max_entries: int = Field(100_000, gt=0, le=100_000_000)  # allocation events kept in the recorded history


class WorkloadConfig(_Section):
    """What `zmon run` generates (owned by zmon.workload)."""

    prompts_file: UserPath | None = None  # one prompt per line; null = built-in list
    # "WIDTHxHEIGHT"; empty = the model's default (checked against the pipeline's multiple by
    # zmon.workload.spec.validate_workload, which check-config runs too)
    resolutions: list[str] = Field(default_factory=list, max_length=1024)
    # Lower bounds are checked with the rest of the workload (validate_workload), so they are listed together.
    steps: int | None = Field(None, le=1000)  # null = the model's default (Z-Image-Turbo: 9 = 8 DiT forwards)
    guidance_scale: float | None = Field(None, le=100)  # null = the model's default (Z-Image-Turbo: 0.0)
    batch_size: int = Field(1, gt=0, le=1024)
    seed: int | None = Field(0, ge=0, le=2**63 - 1)  # torch generators take 64-bit seeds; seed + i must fit
    init_images: list[UserPath] = Field(default_factory=list, max_length=10_000)  # non-empty = img2img
    strength: float = Field(0.6, gt=0, le=1)
    max_generations: int | None = Field(None, gt=0, le=10**12)  # null = forever
    # null = back to back; at least one a fortnight (a longer wait between generations is not a workload)
    rate_per_second: float | None = Field(None, ge=1e-6, le=1e6)
    output_dir: UserPath | None = None
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
    step_cv_high: float = Field(0.15, ge=0, le=100)  # within-generation CV of step times above this → kernel issue
    # Steps shorter than this are not judged for unevenness: thread scheduling noise is a few milliseconds.
    min_step_seconds: float = Field(0.02, ge=0, le=3600)
    run_cv_high: float = Field(0.10, ge=0, le=100)  # run-to-run CV above this → I/O or caching
    read_throughput_low: float = Field(500e6, gt=0, le=1e13)  # bytes/s; model reads slower than this → I/O-bound
    min_checkpoint_bytes: float = Field(1e9, ge=0, le=1e15)  # smaller checkpoints: read throughput shown, not judged
    checkpoint_load_high: float = Field(10.0, gt=0, le=86400)  # seconds; loading longer than this → I/O-bound
    first_gen_slowdown_high: float = Field(3.0, gt=1, le=1000)  # first generation / steady-state median
    text_encode_share_high: float = Field(0.25, ge=0, le=1)  # share of a generation (CPU-bound hint)
    postprocess_share_high: float = Field(0.15, ge=0, le=1)  # output processing share (CPU-bound hint)
    cpu_busy_high: float = Field(0.9, ge=0, le=4096)  # process cores busy at or above this = saturated
    fragmentation_high: float = Field(0.30, ge=0, le=1)  # inactive_split / reserved
    latency_trend_high: float = Field(1.2, gt=1, le=1000)  # late-run median / early-run median (slowing down)
    nccl_share_high: float = Field(0.2, ge=0, le=1)  # share of time in NCCL collectives
    scaling_efficiency_low: float = Field(0.75, gt=0, le=1)  # multi-GPU speedup / GPU count
    untimed_share_high: float = Field(0.10, ge=0, le=1)  # generation time outside every timed stage
    headroom_low: float = Field(0.10, ge=0, le=1)  # (device free + allocator cache) / card below this = pressure
    io_read_rate_high: float = Field(100e6, gt=0, le=1e13)  # bytes/s read from storage during generations = I/O-bound
    outlier_ratio_high: float = Field(3.0, gt=1, le=1000)  # a run over this × the median is an outlier (left out)
    # Share of the wall time the GPU waits between pipeline calls above this, while the process works
    # (between_busy_cores) → CPU-bound: the caller's data loading or pre/post-processing between generations.
    between_idle_share_high: float = Field(0.25, ge=0, le=1)
    between_busy_cores: float = Field(0.5, ge=0, le=4096)  # process cores busy between calls: the caller works

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
        "between_idle_share_high": ("between_generations_idle_share_ratio", ">"),
        "between_busy_cores": ("between_generations_process_cpu_cores", ">="),
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
    directory: UserPath = Path("zmon-traces")  # where trace-<time>.json files are written
    max_generations: int = Field(20, gt=0, le=1000)  # the most generations one request may capture


class ProfilingConfig(_Section):
    """`zmon profile` defaults and the diagnosis thresholds."""

    runs: int = Field(20, gt=0, le=100_000)  # baseline generations after warm-up (the article's 20)
    warmup: int = Field(1, ge=0, le=10_000)  # generations run first and left out of the baseline
    # NVML util+memory and psutil reads during the profile. NVML's own averaging period is 1/6 s to 1 s,
    # so faster sampling repeats values; 0.1 s resolves a 150 ms denoise step.
    sample_interval_seconds: float = Field(0.1, ge=MIN_INTERVAL_SECONDS, le=60)
    # Sequential read/write test in the model directory (0 = skip the disk test).
    disk_test_bytes: int = Field(256 * 1024 * 1024, ge=0, le=1 << 40)
    output_dir: UserPath = Path("zmon-profile")
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
    periodic_empty_cache_generations: int | None = Field(None, gt=0, le=10**9)
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
    password_file: UserPath  # read at each send, so a rotated secret is picked up


class AlertingConfig(_Section):
    """Alertmanager v2 client. No URLs = alerting off (alert actions are then only logged and counted)."""

    alertmanager_urls: tuple[str, ...] = ()  # e.g. ["http://127.0.0.1:9093"]; each gets every alert
    # Active alerts are re-sent this often: Alertmanager expires an alert without endsAt after its
    # resolve_timeout (default 5m).
    resend_seconds: float = Field(60.0, ge=0.1, le=86400)
    timeout_seconds: float = Field(5.0, gt=0, le=300)  # per HTTP request
    retries: int = Field(3, ge=0, le=100)  # extra attempts per delivery on network errors, 5xx and 429
    backoff_seconds: float = Field(0.5, gt=0, le=3600)  # first retry delay; doubles per attempt
    max_backoff_seconds: float = Field(8.0, gt=0, le=3600)
    queue_size: int = Field(1000, gt=0, le=1_000_000)  # pending deliveries per URL; the oldest is dropped
    basic_auth: BasicAuthConfig | None = None
    bearer_token_file: UserPath | None = None
    ca_file: UserPath | None = None  # CA bundle for https URLs (default: the system store)
    # runbook_url = this + alertname in lower case. null: the runbooks this zmon serves itself,
    # http://<server.listen>/runbooks#runbook- (set it where people reach zmon, or to your own copy).
    runbook_base_url: str | None = None
    # Label `instance`. null = what Prometheus calls the scraped target: the listen address as host:port, with
    # this host's name for a wildcard address (0.0.0.0, ::), so Alertmanager can match zmon's alerts with the
    # rule-based ones (inhibition, grouping). Set it when Prometheus reaches zmon under another name.
    instance: str | None = Field(None, min_length=1)
    # When zmon stops, send endsAt for the alerts it fired, so they resolve now instead of after
    # Alertmanager's resolve_timeout; false: leave them to expire (e.g. a restart that should not page twice).
    resolve_on_shutdown: bool = True
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
    _origins: dict[tuple[str, ...], str] = PrivateAttr(default_factory=dict)

    @property
    def notes(self) -> tuple[str, ...]:
        """Deprecations and migrations applied while loading (shown by the CLI as warnings)."""
        return tuple(self._notes)

    def origin(self, path: str) -> str | None:
        """The environment variable or flag that set the key at dotted `path` (or a section around it); None
        when it comes from the file or the defaults. Lets later checks blame the right input."""
        parts = tuple(re.sub(r"\[\d+\]", "", path).split("."))
        best = None
        for p, name in self._origins.items():
            if parts[: len(p)] == p and (best is None or len(p) > len(best[0])):
                best = (p, name)
        return None if best is None else best[1]

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


# ------------------------------------------------------------------------------------------------ reading


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses what would otherwise end in a traceback: nesting deeper than MAX_YAML_DEPTH
    (PyYAML's composer recurses once per level, so 10,000 '[' exhaust the stack) and integers too long for
    Python to convert (a 5,000-digit literal raises ValueError from int())."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_YAML_DEPTH} levels deep", self.get_mark()
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node: Any) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            raise yaml.constructor.ConstructorError(
                None, None, "an integer too long to be a setting", node.start_mark
            ) from None


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def _within_budget(data: Any, budget: int = MAX_YAML_NODES) -> bool:
    """True when `data` holds at most `budget` values, counting every path to a shared value (aliases) and
    stopping at the budget (so a self-referencing alias is refused, not walked forever)."""
    stack = [data]
    seen = 0
    while stack:
        x = stack.pop()
        seen += 1
        if seen > budget:
            return False
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return True


def parse_yaml(raw: bytes | str, source: str) -> Any:
    """YAML text (bytes must be UTF-8) → Python data; raises ConfigError with the reason, never anything else."""
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
            raise ConfigError(
                [f"not UTF-8 text: invalid byte 0x{raw[e.start]:02x} at line {line}, column {column}"], source
            ) from None
    else:
        text = raw
    try:
        data = yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
    except yaml.YAMLError as e:
        where = re.sub(r'in "<unicode string>", ', "at ", str(e))  # the file is named by `source`
        raise ConfigError([f"invalid YAML: {where}"], source) from None
    except (ValueError, RecursionError, MemoryError) as e:  # belt and braces: no traceback from a bad file
        raise ConfigError([f"invalid YAML: {type(e).__name__}: {e}"], source) from None
    if not _within_budget(data):
        raise ConfigError(
            [f"(top level): more than {MAX_YAML_NODES} values once aliases are expanded (an alias bomb?)"], source
        )
    return data


def read_yaml_file(path: str | Path, source: str | None = None) -> Any:
    """Read and parse a YAML file of at most MAX_CONFIG_BYTES; raises ConfigError (unreadable, too large,
    not UTF-8, invalid YAML)."""
    source = source or str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError([f"cannot read: {e.strerror or e}"], source) from None
    except ValueError as e:  # a path with a NUL byte
        raise ConfigError([f"cannot read: {e}"], source) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError([f"larger than {MAX_CONFIG_BYTES // (1024 * 1024)} MiB: not a configuration file"], source)
    return parse_yaml(raw, source)


# ------------------------------------------------------------------------------------------------ the schema


def _models_in(annotation: Any) -> tuple[list[type[BaseModel]], type[BaseModel] | None]:
    """(models a field holds directly, the model of a dict[str, Model] field's values)."""
    direct: list[type[BaseModel]] = []
    mapped: type[BaseModel] | None = None
    todo = [annotation]
    while todo:
        a = todo.pop()
        origin = typing.get_origin(a)
        if origin is Annotated:
            todo.append(typing.get_args(a)[0])
        elif origin in (typing.Union, types.UnionType):
            todo.extend(typing.get_args(a))
        elif origin is dict:
            value = typing.get_args(a)[1]
            if isinstance(value, type) and issubclass(value, BaseModel):
                mapped = value
        elif isinstance(a, type) and issubclass(a, BaseModel):
            direct.append(a)
    return direct, mapped


def _schema() -> tuple[dict[tuple[str, ...], set[str]], list[tuple[str, ...]]]:
    """({section path: its keys}, every leaf key path) of Config; policy.rules lists the default rules."""
    children: dict[tuple[str, ...], set[str]] = {}
    leaves: list[tuple[str, ...]] = []

    def walk(model: type[BaseModel], prefix: tuple[str, ...]) -> None:
        for name, f in model.model_fields.items():
            children.setdefault(prefix, set()).add(name)
            path = (*prefix, name)
            direct, mapped = _models_in(f.annotation)
            if direct:
                for m in direct:
                    walk(m, path)
            elif mapped is not None and path == ("policy", "rules"):
                for rule in default_rules():
                    children.setdefault(path, set()).add(rule.name)
                    walk(mapped, (*path, rule.name))
                children[(*path, "<name>")] = set(mapped.model_fields)
            else:
                leaves.append(path)

    walk(Config, ())
    return children, leaves


_SCHEMA: tuple[dict[tuple[str, ...], set[str]], list[tuple[str, ...]]] | None = None


def _schema_cached() -> tuple[dict[tuple[str, ...], set[str]], list[tuple[str, ...]]]:
    global _SCHEMA
    if _SCHEMA is None:
        _SCHEMA = _schema()
    return _SCHEMA


def env_name(path: tuple[str, ...] | str) -> str:
    """('sampling', 'nvml', 'interval_seconds') or 'sampling.nvml.interval_seconds' → ZMON_SAMPLING__NVML__…"""
    parts = path.split(".") if isinstance(path, str) else path
    return ENV_PREFIX + "__".join(parts).upper()


def _did_you_mean(word: str, choices: set[str] | list[str]) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _suggest_key(loc: tuple[str, ...]) -> str:
    """'; did you mean interval_seconds?' for an unknown key at `loc`, from its section's keys."""
    children, _ = _schema_cached()
    parent = loc[:-1]
    if len(parent) == 3 and parent[:2] == ("policy", "rules"):
        parent = ("policy", "rules", "<name>")
    return _did_you_mean(loc[-1], children.get(parent, set()))


def _suggest_env(name: str) -> str:
    """'; did you mean ZMON_…?' for an environment variable that names no setting."""
    _, leaves = _schema_cached()
    candidates = [env_name(p) for p in leaves] + list(NON_CONFIG_ENV)
    squeeze = re.sub(r"_+", "_", name.upper())
    same = [c for c in candidates if re.sub(r"_+", "_", c) == squeeze]
    if same:  # ZMON_SAMPLING_NVML_INTERVAL_SECONDS: levels are separated by two underscores
        return f"; did you mean {same[0]}?"
    return _did_you_mean(name.upper(), candidates)


# ------------------------------------------------------------------------------------------------ overrides


def _loc_text(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _format_errors(
    err: ValidationError,
    origins: Mapping[tuple[str, ...], str] | None = None,
    file_data: Any = None,
) -> list[tuple[str | None, str]]:
    """(origin, 'path: message') for each error; origin is the variable or flag that set the value, None for
    the file. Unknown keys get a suggestion from the keys of their section."""
    out: list[tuple[str | None, str]] = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        origin = _origin(loc, e["type"], origins or {})
        if origin is None and origins and not _present(file_data, loc):
            origin = _nearest_origin(loc, origins)  # a value derived from an override (a rule's clear level)
        if e["type"] == "extra_forbidden":
            hint = _suggest_key(loc)
            if origin is not None and origin[0].startswith(ENV_PREFIX) and hint:
                hint = f"; did you mean {env_name((*loc[:-1], hint.removeprefix('; did you mean ').rstrip('?')))}?"
            msg = "unknown key" + hint
        if origin is None:
            out.append((None, f"{_loc_text(loc)}: {msg}"))
        elif loc == origin[1]:  # a variable spells its key; a flag says which key it sets
            named = origin[0] if origin[0].startswith(ENV_PREFIX) else f"{origin[0]} ({_loc_text(loc)})"
            out.append((origin[0], f"{named}: {msg}"))
        else:
            out.append((origin[0], f"{origin[0]}: {_loc_text(loc)}: {msg}"))
    return out


def _origin(
    loc: tuple[str, ...], kind: str, origins: Mapping[tuple[str, ...], str]
) -> tuple[str, tuple[str, ...]] | None:
    """The override behind an error at `loc`: one that set `loc` or a section around it, or (for a missing key)
    one that created the section the key is missing from."""
    best: tuple[str, tuple[str, ...]] | None = None
    for path, name in origins.items():
        inside = loc[: len(path)] == path
        created = kind == "missing" and len(path) > len(loc) - 1 and path[: len(loc) - 1] == loc[:-1]
        if (inside or created) and (best is None or len(path) > len(best[1])):
            best = (name, path)
    return best


def _present(data: Any, loc: tuple[str, ...]) -> bool:
    """Whether the file's data holds a value at `loc` (or the section around it, for a whole-section error)."""
    node = data
    for part in loc:
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def _nearest_origin(loc: tuple[str, ...], origins: Mapping[tuple[str, ...], str]) -> tuple[str, tuple[str, ...]] | None:
    """The override that shares the longest leading key path with `loc` (at least its section's)."""
    best: tuple[int, str, tuple[str, ...]] | None = None
    for path, name in origins.items():
        common = 0
        for a, b in zip(path, loc, strict=False):
            if a != b:
                break
            common += 1
        if common >= max(1, len(loc) - 1) and (best is None or common > best[0]):
            best = (common, name, path)
    return None if best is None else (best[1], best[2])


def _env_value(raw: str) -> Any:
    """An environment value as a YAML scalar (numbers and booleans keep their type); the text itself when it
    is not YAML, or is more than a scalar or a small flow collection can be."""
    try:
        value = yaml.load(raw, Loader=_Loader)  # _Loader is a SafeLoader
    except Exception:  # anything PyYAML or int() raises: the text is taken as it is
        return raw
    return value if _within_budget(value, 10_000) else raw


def _env_entries(
    environ: Mapping[str, str], token_env: str | None
) -> tuple[dict[tuple[str, ...], tuple[str, Any]], list[str]]:
    """{path: (variable, value)} of the ZMON_ variables that name settings, and the problems with the others."""
    sections = set(Config.model_fields)
    allowed = set(NON_CONFIG_ENV) | ({token_env} if token_env else set())
    entries: dict[tuple[str, ...], tuple[str, Any]] = {}
    problems: list[str] = []
    for key in sorted(environ):
        if not key.startswith(ENV_PREFIX) or key in allowed:
            continue
        parts = tuple(key[len(ENV_PREFIX) :].lower().split("__"))
        if parts[0] not in sections or len(parts) < 2:
            what = "names no setting" if parts[0] not in sections else "names a whole section, not a key in it"
            problems.append(
                f"{key}: {what} (settings are ZMON_<SECTION>__<KEY>, levels separated by two underscores)"
                + _suggest_env(key)
            )
            continue
        if any(p == "" for p in parts):
            problems.append(f"{key}: an empty key between two '__'" + _suggest_env(key))
            continue
        if parts in entries:
            problems.append(f"{entries[parts][0]} and {key} both set {'.'.join(parts)}")
            continue
        entries[parts] = (key, _env_value(environ[key]))
    for path, (name, _) in sorted(entries.items()):
        for other, (other_name, _) in entries.items():
            if len(other) > len(path) and other[: len(path)] == path:
                problems.append(
                    f"{name} and {other_name} conflict: {name} sets {'.'.join(path)} as a whole, {other_name} "
                    f"sets {'.'.join(other)} inside it; keep one"
                )
    return entries, problems


def _tree(entries: Mapping[tuple[str, ...], tuple[str, Any]]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, (_, value) in entries.items():
        node = tree
        for p in path[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):  # a conflict, reported by _env_entries: the longer path is dropped
                break
            node = nxt
        else:
            node[path[-1]] = value
    return tree


def env_overrides(environ: Mapping[str, str], *, token_env: str | None = None) -> dict[str, Any]:
    """ZMON_SAMPLING__NVML__INTERVAL_SECONDS=2 → {'sampling': {'nvml': {'interval_seconds': 2}}}.

    Values are parsed as YAML scalars so numbers and booleans keep their type. The names in NON_CONFIG_ENV
    (and `token_env`) are skipped; any other ZMON_ name that names no setting, and two variables that set
    the same value or a value and a key inside it, raise ConfigError naming the variables.
    """
    entries, problems = _env_entries(environ, token_env)
    if problems:
        raise ConfigError(problems, "environment")
    return _tree(entries)


def deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _token_env(*layers: Any) -> str | None:
    """server.auth.token_env as the layers (file, environment, flags) set it, later wins; None if unset."""
    name: str | None = None
    for layer in layers:
        server = layer.get("server") if isinstance(layer, Mapping) else None
        auth = server.get("auth") if isinstance(server, Mapping) else None
        value = auth.get("token_env") if isinstance(auth, Mapping) else None
        if isinstance(value, str):
            name = value
    return name


def _flag_paths(flags: Mapping[str, str] | None) -> dict[tuple[str, ...], str]:
    return {tuple(k.split(".")): v for k, v in (flags or {}).items()}


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    flags: Mapping[str, str] | None = None,
) -> Config:
    """Read YAML (optional), apply ZMON_ environment then CLI overrides, validate; raise ConfigError.

    Every problem is listed at once with where it comes from: the file's key path, the environment variable
    (`ZMON_SAMPLING__NVML__INTERVAL_SECONDS: ...`) or the command-line flag (`flags` maps a dotted key path of
    `overrides` to the flag that set it, e.g. {"server.listen": "--listen"}). Nothing here raises anything
    but ConfigError, whatever the input.
    """
    source = str(path) if path is not None else "config"
    data: Any = {}
    problems: list[str] = []
    file_problem = False
    if path is not None:
        try:
            data = read_yaml_file(path, source)
        except ConfigError as e:
            problems.extend(e.problems)
            file_problem = True
            data = {}
        if data is None:
            data = {}
        if not isinstance(data, dict):
            problems.append(f"(top level): expected a mapping of sections, got {type(data).__name__}")
            file_problem = True
            data = {}
    env = os.environ if environ is None else environ
    entries, env_problems = _env_entries(env, _token_env(data, _tree_safe(env), overrides or {}))
    problems.extend(env_problems)
    if problems:
        raise ConfigError(problems, source if file_problem else "environment")
    origins = {p: name for p, (name, _) in entries.items()}
    origins.update(_flag_paths(flags))
    file_data = data
    data = deep_merge(data, _tree(entries))
    if overrides:
        data = deep_merge(data, overrides)
    with _collect_notes() as notes:
        try:
            cfg = Config.model_validate(data)
        except ValidationError as e:
            found = _format_errors(e, origins, file_data)
            from_file = any(origin is None for origin, _ in found)
            raise ConfigError(
                [text for _, text in found],
                source if from_file or not found else _origins_label(origin for origin, _ in found),
            ) from None
        except (RecursionError, ValueError, TypeError, OverflowError) as e:  # a validator bug: still no traceback
            raise ConfigError([f"(top level): cannot validate: {type(e).__name__}: {e}"], source) from None
    cfg._notes.extend(notes)
    cfg._origins.update(origins)
    return cfg


def _tree_safe(environ: Mapping[str, str]) -> dict[str, Any]:
    """The environment's overrides for reading server.auth.token_env before the names are checked."""
    raw = environ.get(env_name(("server", "auth", "token_env")))
    return {"server": {"auth": {"token_env": raw}}} if raw else {}


def _origins_label(origins: Iterable[str | None]) -> str:
    names = {o for o in origins if o}
    env = any(n.startswith(ENV_PREFIX) for n in names)
    flag = any(n.startswith("-") for n in names)
    return "environment and command line" if env and flag else "environment" if env else "command line"
