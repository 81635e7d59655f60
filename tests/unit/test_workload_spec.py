"""Workload spec: prompts, resolutions, steps and init images validated before any model loads."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from zmon.config import Config
from zmon.workload.spec import (
    BUILTIN_PROMPTS,
    WorkloadError,
    build_spec,
    parse_resolution,
    read_prompts,
    recheck_resolutions,
    resolution_multiple,
    static_pipeline_class,
    validate_workload,
)

TINY = {"resolution": (64, 64), "steps": 9, "guidance_scale": 0.0, "distilled": True}


def cfg(**workload: Any) -> Config:
    model = workload.pop("model", {})
    return Config.model_validate({"workload": workload, "model": model})


def png(path: Path, size: tuple[int, int] = (32, 32)) -> Path:
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


def test_defaults_come_from_the_model() -> None:
    c = Config()
    assert validate_workload(c) == []
    spec = build_spec(c, TINY)
    assert spec.prompts == BUILTIN_PROMPTS
    assert spec.resolutions == ((64, 64),)
    assert (spec.steps, spec.guidance_scale, spec.batch_size, spec.distilled) == (9, 0.0, 1, True)
    assert not spec.img2img


def test_builtin_prompts_are_varied_in_length() -> None:
    lengths = sorted(len(p) for p in BUILTIN_PROMPTS)
    assert len(BUILTIN_PROMPTS) >= 20 and len(set(BUILTIN_PROMPTS)) == len(BUILTIN_PROMPTS)
    assert lengths[0] < 15 and lengths[-1] > 200


def test_prompts_file_skips_blank_lines_and_comments(tmp_path: Path) -> None:
    f = tmp_path / "prompts.txt"
    f.write_text("# my prompts\n\na cat\n   \n  a dog on a skateboard  \n# end\n", encoding="utf-8")
    assert read_prompts(f) == ["a cat", "a dog on a skateboard"]
    spec = build_spec(cfg(prompts_file=str(f), steps=4, guidance_scale=1.5), TINY)
    assert spec.prompts == ("a cat", "a dog on a skateboard")
    assert (spec.steps, spec.guidance_scale) == (4, 1.5)


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        (b"", "contains no prompts"),
        (b"# only a comment\n\n", "contains no prompts"),
        (b"a cat\n\xff\xfe broken\n", "is not UTF-8 text (invalid byte 0xff on line 2)"),
    ],
)
def test_bad_prompts_file_names_the_path(tmp_path: Path, content: bytes, expect: str) -> None:
    f = tmp_path / "prompts.txt"
    f.write_bytes(content)
    problems = validate_workload(cfg(prompts_file=str(f)))
    assert len(problems) == 1
    assert problems[0].startswith(f"workload.prompts_file: {f}") and expect in problems[0]


def test_unreadable_prompts_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    assert validate_workload(cfg(prompts_file=str(missing))) == [
        f"workload.prompts_file: cannot read {missing}: No such file or directory"
    ]
    assert "Is a directory" in validate_workload(cfg(prompts_file=str(tmp_path)))[0]


@pytest.mark.parametrize(
    ("value", "expect"),
    [
        ("1024", "is not WIDTHxHEIGHT"),
        ("axb", "is not WIDTHxHEIGHT"),
        ("0x512", "must be positive"),
        ("-16x512", "must be positive"),
        ("1000x1024", "multiples of 16"),
    ],
)
def test_bad_resolution(value: str, expect: str) -> None:
    with pytest.raises(ValueError, match=expect) as e:
        parse_resolution(value, 16)
    assert repr(value) in str(e.value)


def test_resolution_parsing() -> None:
    assert parse_resolution("1024x768", 16) == (1024, 768)
    assert parse_resolution(" 512X512 ", 16) == (512, 512)
    with pytest.raises(ValueError, match="nearest: 1008x1024"):
        parse_resolution("1000x1024", 16)


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(b"\xc3\x28 bad utf-8\n")
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    c = cfg(
        prompts_file=str(prompts),
        resolutions=["64x64", "100x64", "0x64", "big"],
        steps=0,
        guidance_scale=-1,
        init_images=[str(tmp_path / "missing.png"), str(not_image), str(png(tmp_path / "ok.png"))],
    )
    problems = validate_workload(c)
    assert len(problems) == 8, problems
    joined = "\n".join(problems)
    for fragment in (
        f"workload.prompts_file: {prompts} is not UTF-8",
        "workload.resolutions[1]: '100x64': width and height must be multiples of 16",
        "workload.resolutions[2]: '0x64'",
        "workload.resolutions[3]: 'big' is not WIDTHxHEIGHT",
        "workload.steps: must be > 0, got 0",
        "workload.guidance_scale: must be >= 0, got -1.0",
        f"workload.init_images[0]: {tmp_path / 'missing.png'} does not exist",
        f"workload.init_images[1]: {not_image} is not an image Pillow can read",
    ):
        if fragment.startswith("workload.resolutions[2]"):
            assert fragment in joined and "must be positive" in joined
        else:
            assert fragment in joined, fragment
    with pytest.raises(WorkloadError) as e:
        build_spec(c, TINY)
    assert e.value.problems == problems


def test_truncated_image_is_reported(tmp_path: Path) -> None:
    good = png(tmp_path / "good.png", (64, 64))
    broken = tmp_path / "broken.png"
    broken.write_bytes(good.read_bytes()[:60])
    problems = validate_workload(cfg(init_images=[str(broken)]))
    assert problems == [f"workload.init_images[0]: {broken} is a damaged image: Truncated File Read"]


def test_img2img_spec(tmp_path: Path) -> None:
    img = png(tmp_path / "init.png")
    spec = build_spec(cfg(init_images=[str(img)], strength=0.5), TINY)
    assert spec.img2img and spec.init_images == (img,) and spec.strength == 0.5
    assert static_pipeline_class(cfg(init_images=[str(img)])) == "ZImageImg2ImgPipeline"


def test_output_dir_must_be_a_directory(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    problems = validate_workload(cfg(output_dir=str(f)))
    assert problems == [f"workload.output_dir: {f} exists and is not a directory"]


def test_static_pipeline_class_and_multiple(tmp_path: Path) -> None:
    assert static_pipeline_class(Config()) == "ZImagePipeline"
    assert static_pipeline_class(cfg(model={"id": "Tongyi-MAI/Z-Image-Turbo"})) == "ZImagePipeline"
    assert resolution_multiple("ZImagePipeline") == 16
    assert static_pipeline_class(cfg(model={"id": "someone/unknown"})) is None
    assert resolution_multiple(None) == 8
    model_dir = tmp_path / "sd"
    model_dir.mkdir()
    (model_dir / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    c = cfg(model={"id": str(model_dir)}, resolutions=["520x512"])
    assert static_pipeline_class(c) == "StableDiffusionPipeline"
    assert validate_workload(c) == []  # 8 is enough for SD
    assert validate_workload(cfg(model={"id": "Tongyi-MAI/Z-Image-Turbo"}, resolutions=["520x512"]))


def test_item_cycles_prompts_by_resolutions() -> None:
    spec = build_spec(cfg(resolutions=["64x64", "128x64"], seed=7), TINY)
    items = [spec.item(i) for i in range(5)]
    p0, p1, p2 = BUILTIN_PROMPTS[:3]
    assert items == [(p0, (64, 64)), (p0, (128, 64)), (p1, (64, 64)), (p1, (128, 64)), (p2, (64, 64))]
    assert [spec.seed_for(i) for i in range(3)] == [7, 8, 9]
    assert build_spec(cfg(seed=None), TINY).seed_for(3) is None


def test_recheck_against_the_loaded_pipeline() -> None:
    spec = build_spec(cfg(resolutions=["64x64", "80x64"]), TINY)
    assert recheck_resolutions(spec, 16) == []
    problems = recheck_resolutions(spec, 32)
    assert problems == [
        "workload.resolutions[1]: '80x64': width and height must be multiples of 32 for the loaded pipeline; "
        "nearest: 96x64"
    ]


def _run_cli_in_subprocess(args: list[str]) -> dict[str, Any]:
    code = textwrap.dedent(
        f"""
        import json, sys, time
        t0 = time.monotonic()
        from zmon.cli import main
        rc = main({args!r})
        heavy = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
        print("RESULT=" + json.dumps({{"rc": rc, "heavy": heavy, "seconds": time.monotonic() - t0}}))
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT="))
    out: dict[str, Any] = json.loads(line.removeprefix("RESULT="))
    out["stderr"] = r.stderr
    return out


def test_zmon_run_exits_2_before_loading_anything(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# nothing here\n")
    config = tmp_path / "zmon.yaml"
    config.write_text(
        f"model:\n  cache_dir: {tmp_path / 'cache'}\n"
        f"workload:\n  prompts_file: {prompts}\n  resolutions: ['1000x1000', '64x64']\n  steps: 0\n"
    )
    t0 = time.monotonic()
    out = _run_cli_in_subprocess(["run", "--config", str(config), "--listen", "127.0.0.1:0"])
    assert out["rc"] == 2, out
    assert out["heavy"] == [], f"imported {out['heavy']} before reporting config errors"
    assert out["seconds"] < 5 and time.monotonic() - t0 < 30, out
    err = out["stderr"]
    assert f"{config}: 3 error(s)" in err, err
    assert f"workload.prompts_file: {prompts} contains no prompts" in err
    assert "workload.resolutions[0]: '1000x1000': width and height must be multiples of 16" in err
    assert "workload.steps: must be > 0, got 0" in err
    assert not (tmp_path / "cache").exists(), "the model must not be built before validation passes"


def test_zmon_run_rejects_a_bad_max_generations() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "zmon", "run", "--max-generations", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "expected a positive integer" in r.stderr
