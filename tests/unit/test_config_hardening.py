"""Configuration input that used to end in a traceback or pass check-config and then break start-up: every
case is a listed error with its key path (or the variable / flag that set it), exit code 2 from the CLI."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
from apscheduler.triggers.interval import IntervalTrigger

from zmon.app.checks import check
from zmon.cli import main
from zmon.config import (
    MAX_INTERVAL_SECONDS,
    NON_CONFIG_ENV,
    Config,
    ConfigError,
    env_overrides,
    load_config,
)


def _errors(tmp_path: Path, text: str | bytes, environ: dict[str, str] | None = None) -> list[str]:
    p = tmp_path / "zmon.yaml"
    if isinstance(text, str):
        p.write_text(text)
    else:
        p.write_bytes(text)
    with pytest.raises(ConfigError) as exc:
        load_config(p, environ=environ or {})
    return exc.value.problems


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("a: " + "[" * 20_000 + "]" * 20_000, "nested more than 64 levels deep"),
        ("sampling:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(100)), "nested more than 64"),
        ("server:\n  max_connections: " + "9" * 5000, "an integer too long to be a setting"),
        ("sampling:\n  nvml:\n    interval_seconds: " + "9" * 4000, "sampling.nvml.interval_seconds"),
        (b'server:\n  listen: "\xff\xfe"\n', "not UTF-8 text: invalid byte 0xff at line 2"),
        ("workload:\n  output_dir: ~nosuchuser/x\n", "workload.output_dir: '~nosuchuser/x': no user named"),
        ("sampling:\n  disk:\n    paths: ['~nosuchuser']\n", "sampling.disk.paths.0"),
        (
            "sampling:\n  nvml:\n    interval_seconds: .inf\n",
            "sampling.nvml.interval_seconds: Input should be a finite",
        ),
        ("sampling:\n  host:\n    interval_seconds: 1e12\n", "sampling.host.interval_seconds: Input should be less"),
        ("sampling:\n  misfire_grace_seconds: 1e12\n", "sampling.misfire_grace_seconds: Input should be less"),
        ("sampling:\n  nvml:\n    interval_seconds: .nan\n", "finite number"),
        ("workload:\n  rate_per_second: 1.0e-300\n", "workload.rate_per_second"),
        ("workload:\n  seed: " + "9" * 30 + "\n", "workload.seed"),
        ("policy:\n  rules:\n    ooms_rising:\n      cooldown_seconds: 1.0e+300\n", "cooldown_seconds"),
        ("sampling:\n  disk:\n    exclude_devices: '(['\n", "not a valid regular expression"),
        ("server:\n  auth:\n    token_env: 'A B'\n", "not an environment variable name"),
        (
            "a: &a [x,x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
            "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
            "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\n",
            "aliases are expanded",
        ),
        ("policy: &a\n  rules: [*a]\n", "aliases are expanded"),
        ("sampling:\n  nvml:\n    intervl_seconds: 2\n", "unknown key; did you mean interval_seconds?"),
        ("- a list\n", "expected a mapping of sections"),
        ("{1: 2}\n", "Keys should be strings"),
    ],
)
def test_bad_files_are_listed_errors(tmp_path: Path, text: str | bytes, fragment: str) -> None:
    problems = _errors(tmp_path, text)
    assert any(fragment in p for p in problems), problems


def test_every_accepted_interval_is_one_apscheduler_can_schedule() -> None:
    """The bound is what makes check-config's OK mean `zmon run` starts: 1e12 s used to overflow a datetime."""
    now = dt.datetime.now(dt.timezone.utc)
    IntervalTrigger(seconds=MAX_INTERVAL_SECONDS).get_next_fire_time(now, now)
    with pytest.raises(OverflowError):
        IntervalTrigger(seconds=1e12).get_next_fire_time(now, now)


def test_unreadable_inputs_are_listed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path, environ={})  # a directory
    with pytest.raises(ConfigError, match="larger than 16 MiB"):
        load_config("/dev/zero", environ={})


# --- the environment -----------------------------------------------------------------------------------------


def _env_errors(environ: dict[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as exc:
        load_config(environ=environ)
    return exc.value


def test_env_errors_name_the_variable_not_the_file(tmp_path: Path) -> None:
    p = tmp_path / "ok.yaml"
    p.write_text("sampling:\n  host:\n    per_cpu: false\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p, environ={"ZMON_SAMPLING__NVML__INTERVAL_SECONDS": "0"})
    assert exc.value.source == "environment"
    assert exc.value.problems == [
        "ZMON_SAMPLING__NVML__INTERVAL_SECONDS: Input should be greater than or equal to 0.01"
    ]


def test_conflicting_overrides_are_reported() -> None:
    e = _env_errors({"ZMON_SAMPLING__NVML": "1", "ZMON_SAMPLING__NVML__ENABLED": "true"})
    assert e.problems == [
        "ZMON_SAMPLING__NVML and ZMON_SAMPLING__NVML__ENABLED conflict: ZMON_SAMPLING__NVML sets sampling.nvml as a "
        "whole, ZMON_SAMPLING__NVML__ENABLED sets sampling.nvml.enabled inside it; keep one"
    ]
    e = _env_errors({"ZMON_LOGGING__LEVEL": "INFO", "ZMON_logging__level": "DEBUG"})
    assert "both set logging.level" in e.problems[0]


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("ZMON_SAMPLING_NVML_INTERVAL_SECONDS", "ZMON_SAMPLING__NVML__INTERVAL_SECONDS"),
        ("ZMON_SAMPLNG__NVML__INTERVAL_SECONDS", "ZMON_SAMPLING__NVML__INTERVAL_SECONDS"),
        ("ZMON_SAMPLING__NVML__INTERVL", "ZMON_SAMPLING__NVML__INTERVAL_SECONDS"),
        ("ZMON_AUTH_TOKN", "ZMON_AUTH_TOKEN"),
        ("ZMON_SAMPLING", None),
    ],
)
def test_unknown_zmon_variables_are_errors_with_a_suggestion(name: str, suggestion: str | None) -> None:
    e = _env_errors({name: "2"})
    assert len(e.problems) == 1 and e.problems[0].startswith(f"{name}: "), e.problems
    if suggestion:
        assert e.problems[0].endswith(f"did you mean {suggestion}?"), e.problems


def test_legitimate_non_config_variables_are_accepted() -> None:
    env = dict.fromkeys(NON_CONFIG_ENV, "x")
    env["ZMON_SERVER__AUTH__TOKEN_ENV"] = "ZMON_MY_TOKEN"
    env["ZMON_MY_TOKEN"] = "secret"  # the variable server.auth.token_env names, whatever its name
    cfg = load_config(environ=env)
    assert cfg.server.auth.token_env == "ZMON_MY_TOKEN"
    assert env_overrides({"ZMON_AUTH_TOKEN": "x", "PATH": "/bin"}) == {}


def test_env_values_that_are_not_yaml_are_text() -> None:
    cfg = load_config(environ={"ZMON_MODEL__ID": "org/model: [x", "ZMON_ALERTING__EXTERNAL_LABELS__CLUSTER": "eu"})
    assert cfg.model.id == "org/model: [x"
    assert cfg.alerting.external_labels == {"cluster": "eu"}
    e = _env_errors({"ZMON_SAMPLING__HOST__INTERVAL_SECONDS": "9" * 5000})
    assert e.problems[0].startswith("ZMON_SAMPLING__HOST__INTERVAL_SECONDS: ")


def test_flag_errors_name_the_flag() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(environ={}, overrides={"server": {"listen": "nope"}}, flags={"server.listen": "--listen"})
    assert exc.value.source == "command line"
    assert exc.value.problems[0].startswith("--listen (server.listen): ")


# --- the command line ----------------------------------------------------------------------------------------


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("zmon ")


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--linger", "-5"],
        ["run", "--linger", "inf"],
        ["run", "--linger", "nan"],
        ["run", "--max-generations", "0"],
        ["watch", "--pid", "0"],
        ["watch", "--pid", "99999999999"],
        ["diagnose", "--url", "http://x", "--timeout", "0"],
        ["profile", "--runs", "-1"],
    ],
)
def test_nonsensical_flags_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_check_config_reports_what_run_rejects(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The first-hour review: check-config said OK to a workload `zmon run` rejected."""
    p = tmp_path / "zmon.yaml"
    p.write_text(f"workload:\n  resolutions: ['64x']\n  prompts_file: {tmp_path / 'absent.txt'}\n")
    assert main(["check-config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "workload.resolutions[0]: '64x' is not WIDTHxHEIGHT" in err
    assert f"workload.prompts_file: cannot read {tmp_path / 'absent.txt'}" in err


def test_check_config_prints_a_non_utf8_file_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name = os.fsdecode(os.fsencode(str(tmp_path)) + b"/\xff.yaml")
    Path(name).write_text("logging:\n  level: INFO\n")
    assert main(["check-config", name]) == 0
    assert "\\udcff.yaml: OK" in capsys.readouterr().out


def _config(**workload: object) -> Config:
    return Config.model_validate({"workload": workload})


def test_output_dir_that_is_a_file_or_under_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    for out, fragment in ((f, "exists and is not a directory"), (f / "sub", "is not a directory")):
        found = check(_config(output_dir=str(out)), "run")
        assert any(e.startswith("workload.output_dir: ") and fragment in e for e in found.errors), found.errors


def test_jsonl_directory_must_exist(tmp_path: Path) -> None:
    found = check(_config(jsonl={"path": str(tmp_path / "nope" / "g.jsonl")}), "run")
    assert found.errors == [
        f"workload.jsonl.path: the directory {tmp_path / 'nope'} does not exist (zmon does not create it)"
    ]
    assert not check(_config(jsonl={"path": str(tmp_path / "g.jsonl")}), "run").errors


@pytest.mark.parametrize("mode", ["run", "watch", "profile", "attach"])
def test_check_config_checks_everything_a_mode_checks(tmp_path: Path, mode: str) -> None:
    """What any mode rejects, check-config rejects (same function, the union of the checks)."""
    f = tmp_path / "file"
    f.write_text("x")
    cfg = Config.model_validate(
        {
            "server": {"web_config_file": str(tmp_path / "web.yml"), "auth": {"token_file": str(tmp_path / "tok")}},
            "workload": {
                "resolutions": ["64x"],
                "output_dir": str(f),
                "jsonl": {"path": str(tmp_path / "d" / "j")},
                "oom": {"memory_snapshot_dir": str(f)},
            },
            "profiling": {"output_dir": str(f), "trace": {"enabled": True, "directory": str(f)}},
            "alerting": {"alertmanager_urls": ["http://127.0.0.1:9"], "ca_file": str(tmp_path / "ca.pem")},
        }
    )
    errors = set(check(cfg, mode).errors)  # type: ignore[arg-type]
    assert errors, mode
    assert errors <= set(check(cfg, "check-config").errors)


def test_host_checks_blame_the_variable_that_set_the_key(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    cfg = load_config(environ={"ZMON_WORKLOAD__OUTPUT_DIR": str(f)})
    with pytest.raises(ConfigError) as exc:
        from zmon.app.checks import require

        require(cfg, "run", "zmon.yaml")
    assert exc.value.source == "environment"
    assert exc.value.problems == [f"ZMON_WORKLOAD__OUTPUT_DIR: workload.output_dir: {f} exists and is not a directory"]


def test_resolutions_and_model_id_are_bounded(tmp_path: Path) -> None:
    found = check(_config(resolutions=["99999999x16", "1" * 5000 + "x16"]), "check-config")
    assert "workload.resolutions[0]: '99999999x16': width and height must be at most 16384" in found.errors
    assert any(e.startswith("workload.resolutions[1]: ") and "is not WIDTHxHEIGHT" in e for e in found.errors)
    assert any("model.id" in p for p in _errors(tmp_path, "model:\n  id: ''\n"))


def test_a_regex_python_only_warns_about_is_accepted_quietly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """'[[' compiles with a FutureWarning ("possible nested set") that would print a zmon/config.py line."""
    import warnings

    cfg = tmp_path / "zmon.yaml"
    cfg.write_text("sampling:\n  disk:\n    exclude_devices: '^[[a]]$'\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning escaping the validation fails the test
        assert main(["check-config", str(cfg)]) == 0
    assert "Warning" not in capsys.readouterr().err
