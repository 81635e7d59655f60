"""Fuzzing the configuration input (hypothesis): YAML text, raw bytes and ZMON_ environment overrides.

Whatever the input, loading gives a Config or a ConfigError listing 'path: message' problems (exit code 2
from the CLI), never another exception; and a Config that loads passes through check-config's checks without
one either.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zmon.app.checks import check
from zmon.cli import main
from zmon.config import NON_CONFIG_ENV, Config, ConfigError, _schema_cached, env_name, load_config

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
_, LEAVES = _schema_cached()
KEYS = sorted({p for leaf in LEAVES for p in leaf} | {"x", "", "rules", "name"})

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(
        [
            "~nosuchuser/x",
            "~",
            "64x64",
            "64x",
            "1e12",
            ".inf",
            "127.0.0.1:0",
            "0.0.0.0:8739",
            "http://127.0.0.1:9093",
            "[",
            "DEBUG",
            "json",
            "/dev/full",
            "/proc/1/mem",
            "\x00",
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
    max_leaves=12,
)


@st.composite
def config_like(draw: st.DrawFn) -> dict[str, Any]:
    """A mapping shaped like a configuration: real key paths with arbitrary values, plus some noise."""
    data: dict[str, Any] = {}
    for leaf in draw(st.lists(st.sampled_from(LEAVES), max_size=6)):
        node = data
        for part in leaf[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                break
            node = nxt
        else:
            node[leaf[-1]] = draw(values)
    if draw(st.booleans()):
        data[draw(st.sampled_from(KEYS))] = draw(values)
    return data


def _check_problems(e: ConfigError) -> None:
    assert e.problems, "a ConfigError lists at least one problem"
    for p in e.problems:
        assert isinstance(p, str) and ": " in p, p
    str(e)  # renders


def _load(path: Path, environ: dict[str, str] | None = None) -> Config | None:
    try:
        cfg = load_config(path, environ=environ or {})
    except ConfigError as e:
        _check_problems(e)
        return None
    check(cfg, "check-config")  # never raises either
    return cfg


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@SETTINGS
@given(config_like())
def test_structured_yaml_never_raises_anything_but_config_error(workdir: Path, data: dict[str, Any]) -> None:
    p = workdir / "zmon.yaml"
    p.write_text(yaml.safe_dump(data, allow_unicode=True))
    _load(p)


@SETTINGS
@given(st.text(alphabet=string.printable + "[]{}&*!|>'\"%@`ÿ€\t", max_size=300))
def test_yaml_text_never_raises_anything_but_config_error(workdir: Path, text: str) -> None:
    p = workdir / "text.yaml"
    p.write_text(text)
    _load(p)


@SETTINGS
@given(st.binary(max_size=300))
def test_bytes_never_raise_anything_but_config_error(workdir: Path, raw: bytes) -> None:
    p = workdir / "raw.yaml"
    p.write_bytes(raw)
    _load(p)


env_names = st.one_of(
    st.sampled_from([env_name(leaf) for leaf in LEAVES]),
    st.sampled_from(sorted(NON_CONFIG_ENV)),
    st.sampled_from(
        [
            "ZMON_SAMPLING",
            "ZMON_SAMPLING__NVML",
            "ZMON_SAMPLING_NVML_ENABLED",
            "ZMON_",
            "ZMON___",
            "ZMON_POLICY__RULES__X__THRESHOLD",
            "ZMON_ALERTING__EXTERNAL_LABELS__A",
        ]
    ),
    st.text(alphabet=string.ascii_letters + "_", max_size=30).map(lambda s: "ZMON_" + s),
)
env_values = st.one_of(
    st.text(max_size=30).filter(lambda s: "\x00" not in s),
    st.sampled_from(
        [
            "0",
            "-1",
            "1e12",
            ".inf",
            ".nan",
            "true",
            "null",
            "[1, 2]",
            "{a: 1}",
            "~nosuchuser",
            "9" * 5000,
            "[" * 200,
            "&a [*a]",
        ]
    ),
)


@SETTINGS
@given(st.dictionaries(env_names, env_values, max_size=6))
def test_env_overrides_never_raise_anything_but_config_error(workdir: Path, environ: dict[str, str]) -> None:
    try:
        cfg = load_config(environ=environ)
    except ConfigError as e:
        _check_problems(e)
        zmon_vars = [k for k in environ if k.startswith("ZMON_")]
        # every problem names the variable behind it (no file is involved)
        assert all(any(p.startswith(v) for v in zmon_vars) for p in e.problems), e.problems
        return
    check(cfg, "check-config")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config_like())
def test_check_config_exits_0_or_2(workdir: Path, capsys: pytest.CaptureFixture[str], data: dict[str, Any]) -> None:
    p = workdir / "cli.yaml"
    p.write_text(yaml.safe_dump(data, allow_unicode=True))
    assert main(["check-config", str(p)]) in (0, 2)
    out = capsys.readouterr()
    assert "Traceback" not in out.err
