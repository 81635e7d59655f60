"""YAML → validated, frozen configuration; every error reported at once; ZMON_ env and CLI overrides."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from zmon.policy.config import AlertingConfig, PolicyConfig
from zmon.profiling.config import ProfilingConfig

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


class AuthConfig(_Section):
    """Bearer token guarding the endpoints that act (traces, empty_cache, reload)."""

    token_file: Path | None = None
    token_env: str = "ZMON_AUTH_TOKEN"

    def token(self) -> str | None:
        if self.token_file is not None:
            return self.token_file.read_text().strip() or None
        return os.environ.get(self.token_env) or None


class ServerConfig(_Section):
    listen: str = DEFAULT_LISTEN
    auth: AuthConfig = AuthConfig()

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, v: str) -> str:
        parse_listen(v)
        return v


class NvmlConfig(_Section):
    enabled: bool = True
    interval_seconds: float = Field(1.0, gt=0)
    # PCIe throughput blocks ~20 ms per call per GPU: its own slow job; 0 turns it off.
    slow_interval_seconds: float = Field(10.0, ge=0)
    processes: bool = True

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
    # Speed options `zmon tune` measures (applied by zmon.tune.options.apply_model_options at load time).
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

    @field_validator("compile_mode")
    @classmethod
    def _check_compile_mode(cls, v: str | None) -> str | None:
        from zmon.tune.names import COMPILE_MODES

        if v is not None and v not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {v!r}; valid: {', '.join(COMPILE_MODES)}")
        return v

    @field_validator("attention_backend")
    @classmethod
    def _check_attention_backend(cls, v: str | None) -> str | None:
        from zmon.tune.names import ATTENTION_BACKENDS

        if v is not None and v not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {v!r}; valid: {', '.join(ATTENTION_BACKENDS)}")
        return v

    @field_validator("alloc_conf")
    @classmethod
    def _check_alloc_conf(cls, v: str | None) -> str | None:
        from zmon.tune.names import alloc_conf_problem

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


class Config(_Section):
    server: ServerConfig = ServerConfig()
    sampling: SamplingConfig = SamplingConfig()
    logging: LoggingConfig = LoggingConfig()
    model: ModelConfig = ModelConfig()
    workload: WorkloadConfig = WorkloadConfig()
    profiling: ProfilingConfig = ProfilingConfig()
    policy: PolicyConfig = PolicyConfig()
    alerting: AlertingConfig = AlertingConfig()


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
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e), source) from None
