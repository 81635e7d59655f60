"""Configuration: validation lists every error with its path, unknown keys rejected, env overrides, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from zmon.cli import main
from zmon.config import Config, ConfigError, env_overrides, load_config, parse_listen

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_secure() -> None:
    cfg = Config()
    assert cfg.server.listen.startswith("127.0.0.1:")
    assert cfg.server.auth.token_file is None


def test_every_error_reported_at_once(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(
        "server:\n  listen: nowhere\n"
        "sampling:\n  nvml:\n    interval_seconds: -1\n    slow_interval_seconds: 3\n  bogus: 1\n"
        "logging:\n  level: LOUD\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_config(p, environ={})
    problems = exc.value.problems
    paths = sorted(pr.split(":")[0] for pr in problems)
    assert paths == [
        "logging.level",
        "sampling.bogus",
        "sampling.nvml.interval_seconds",
        "sampling.nvml.slow_interval_seconds",
        "server.listen",
    ]
    assert any("unknown key" in pr for pr in problems)


def test_env_overrides_take_types_and_precede_file(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("sampling:\n  nvml:\n    interval_seconds: 5\n")
    env = {
        "ZMON_SAMPLING__NVML__INTERVAL_SECONDS": "2.5",
        "ZMON_SAMPLING__NVML__ENABLED": "false",
        "ZMON_AUTH_TOKEN": "secret",
        "OTHER": "x",
    }
    cfg = load_config(p, environ=env)
    assert cfg.sampling.nvml.interval_seconds == 2.5
    assert cfg.sampling.nvml.enabled is False
    assert env_overrides({"ZMON_AUTH_TOKEN": "x"}) == {}


def test_env_override_errors_are_reported_with_path() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(environ={"ZMON_SAMPLING__HOST__INTERVAL_SECONDS": "soon"})
    assert exc.value.problems[0].startswith("ZMON_SAMPLING__HOST__INTERVAL_SECONDS: ")
    assert exc.value.source == "environment"  # not blamed on a config file


def test_config_is_frozen() -> None:
    cfg = Config()
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        cfg.server.listen = "0.0.0.0:1"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("127.0.0.1:8739", True),
        ("[::1]:80", True),
        ("0.0.0.0:0", True),
        ("host", False),
        (":80", False),
        ("h:99999", False),
        ("h:x", False),
    ],
)
def test_parse_listen(value: str, ok: bool) -> None:
    if ok:
        parse_listen(value)
    else:
        with pytest.raises(ValueError):
            parse_listen(value)


def test_check_config_example_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(ROOT / "config.example.yaml")]) == 0


def test_example_documents_every_key() -> None:
    """config.example.yaml sets every key to its default: loading it equals Config()."""
    import yaml

    data = yaml.safe_load((ROOT / "config.example.yaml").read_text())

    def keys(d: object, prefix: str = "") -> set[str]:
        out: set[str] = set()
        if isinstance(d, dict):
            for k, v in d.items():
                out.add(prefix + k)
                out |= keys(v, prefix + k + ".")
        return out

    def model_keys(m: type, prefix: str = "") -> set[str]:
        from pydantic import BaseModel

        out: set[str] = set()
        for name, f in m.model_fields.items():  # type: ignore[attr-defined]
            out.add(prefix + name)
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                out |= model_keys(ann, prefix + name + ".")
        return out

    missing = model_keys(Config) - keys(data)
    assert not missing, f"config.example.yaml lacks: {sorted(missing)}"
    assert load_config(ROOT / "config.example.yaml", environ={}) == Config()


def test_cli_bad_config_exits_2(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("server: {listen: 1}\nnope: true\n")
    r = subprocess.run([sys.executable, "-m", "zmon", "check-config", str(p)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "nope: unknown key" in r.stderr
    assert "server.listen" in r.stderr


def test_cli_missing_and_invalid_yaml(tmp_path: Path) -> None:
    assert main(["check-config", str(tmp_path / "absent.yaml")]) == 2
    p = tmp_path / "broken.yaml"
    p.write_text("a: [1, 2\n")
    assert main(["check-config", str(p)]) == 2
    p.write_text("- just\n- a list\n")
    assert main(["check-config", str(p)]) == 2


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out.startswith("zmon ")
