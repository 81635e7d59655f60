"""A pipeline that offloads its weights to the CPU (diffusers' enable_*_cpu_offload, through accelerate) is
recognised: that it offloads, where it computes, how much it moves. On this CPU-only host the CPU is the only
device to offload from and to, which is enough to install the real hooks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from zmon.capture.environment import environment_facts
from zmon.instrumentation import anatomy


@pytest.fixture
def own_pipe(tiny_model_dir: Path) -> Any:
    """A pipeline of its own: offloading rewires its modules, the session's shared one must stay as it is."""
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_pipeline_that_keeps_its_weights_resident(own_pipe: Any) -> None:
    expected = sum(
        t.numel() * t.element_size()
        for m in own_pipe.components.values()
        if hasattr(m, "parameters")
        for t in (*m.parameters(), *m.buffers())
    )
    assert anatomy.offload_mode(own_pipe) is None
    assert anatomy.weights_bytes(own_pipe) == expected > 0
    env = environment_facts(own_pipe, model_id="tiny")
    assert env.offload is None and env.weights_bytes == expected and env.device == "cpu"


def test_model_cpu_offload_is_recognised(own_pipe: Any, torch_single_thread: None) -> None:
    size = anatomy.weights_bytes(own_pipe)
    own_pipe.enable_model_cpu_offload(device="cpu")
    assert anatomy.offload_mode(own_pipe) == "model"
    executes = str(own_pipe._execution_device)
    # where it computes, not where the weights rest between uses
    assert anatomy.pipeline_device(own_pipe) == executes and anatomy.text_encoder_device(own_pipe) == executes
    env = environment_facts(own_pipe, model_id="tiny")
    assert (env.offload, env.device, env.weights_bytes) == ("model", executes, size)
    out = own_pipe("a cat", width=64, height=64, num_inference_steps=2, guidance_scale=0.0)
    assert len(out.images) == 1  # it still generates
    own_pipe.remove_all_hooks()
    assert anatomy.offload_mode(own_pipe) is None


def test_sequential_offload_is_recognised() -> None:
    """enable_sequential_cpu_offload() cannot run on this CPU-only host (accelerate's own call fails here), so
    its marks are laid by hand: the pipeline's offload device, an accelerate hook on each component."""
    import torch

    class Pipe:
        def __init__(self) -> None:
            self.transformer = torch.nn.Linear(2, 2)
            self.transformer._hf_hook = object()  # type: ignore[assignment]
            self._offload_device = torch.device("cpu")
            self._execution_device = torch.device("cpu")

        @property
        def components(self) -> dict[str, Any]:
            return {"transformer": self.transformer}

    assert anatomy.offload_mode(Pipe()) == "sequential"
