"""Shared pytest options and fixtures; the tier marker of every test comes from its folder.

- tests/unit: one component in process; fakes only for what cannot exist here (NVML, CUDA); external
  validators (promtool, systemd-analyze) are allowed.
- tests/integration: real parts together in the test process: the embedded tiny pipeline, a real
  Prometheus / Alertmanager / Chromium.
- tests/e2e: the `zmon` command itself, as a subprocess (CLI or daemon), with real services around it.

`pytest -m unit` (or integration, e2e) runs one tier.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).parent
GOLDEN_DIR = TESTS / "golden"
TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            tier = item.path.relative_to(TESTS).parts[0]
        except ValueError:
            continue
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: every test lives in tests/unit, tests/integration or tests/e2e")
        item.add_marker(getattr(pytest.mark, tier))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden", action="store_true", default=False, help="rewrite tests/golden/* from current output"
    )


@pytest.fixture
def golden(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """golden(name, text): compare with tests/golden/<name> (rewritten under --update-golden)."""
    update = request.config.getoption("--update-golden")

    def check(name: str, text: str) -> None:
        path = GOLDEN_DIR / name
        if update or not path.exists():
            if not update:
                pytest.fail(f"golden file {path} missing; run pytest --update-golden")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return
        assert text == path.read_text(), f"output differs from {path} (pytest --update-golden to accept)"

    return check


# --- the embedded tiny Z-Image (zmon.workload.tiny), built once per session --------------------------------


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model.cache_dir holding the built tiny model: ModelConfig(cache_dir=...) finds it, no rebuild."""
    from zmon.workload.tiny import TINY_MODEL_ID, ensure_builtin

    cache = tmp_path_factory.mktemp("zmon-cache")
    ensure_builtin(TINY_MODEL_ID, cache)
    return cache


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_cache_dir: Path) -> Path:
    """The tiny Z-Image pipeline directory (model_index.json, safetensors), built once per session."""
    from zmon.workload.tiny import TINY_DIRNAME

    return tiny_cache_dir / "builtin" / TINY_DIRNAME


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    """A ZImagePipeline on CPU (float32, progress bar off) shared by the session: undo what you apply."""
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(tiny_model_dir)  # float32, as saved
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def torch_single_thread():  # type: ignore[no-untyped-def]
    """Run torch ops on one thread for the test (restored after).

    The tiny model is too small to gain from intra-op threads, and on a shared 2-core machine OpenMP
    barriers under contention make it ~20x slower (2.7 s instead of 0.14 s per image, measured).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
