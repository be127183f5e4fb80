"""checkpoint.async_save in one process on CPU: the background writer (a fork) writes the state
of the moment save() was called, and the checkpoint becomes latest only when waited for.
The same check runs on GPU in tests/gpu (there megatron copies tensors to host before forking)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import cpu_megatron_module, single_process_megatron
from tests.resilience import check_async_snapshot

pytestmark = cpu_megatron_module()

from megatron.core import tensor_parallel  # noqa: E402

from megatron_ext.config.loader import load_config  # noqa: E402
from megatron_ext.model.builder import build_model, resolve_backends  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def model_parallel():
    yield from single_process_megatron()


def test_async_save_writes_the_state_at_the_call(tmp_path):
    cfg = load_config(None, [
        "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
        "model.ffn_hidden_size=48", "model.vocab_size=128", "model.max_position_embeddings=16",
        "moe.num_experts=4", "train.precision=fp32", "data.seq_length=16",
    ])
    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    model = build_model(cfg, resolve_backends(cfg, cuda=False))
    check_async_snapshot(model, None, tmp_path / "ckpt")
