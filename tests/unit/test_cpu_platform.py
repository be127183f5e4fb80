"""Each CPU redirection of megatron_ext.platform.cpu, checked in a fresh interpreter."""

import textwrap

import pytest

from tests.conftest import run_cli

CHECKS = textwrap.dedent("""
    import torch
    from megatron_ext.platform import cpu
    assert not cpu.is_enabled()
    assert cpu.enable_if_needed() is True and cpu.is_enabled()
    cpu.enable()  # idempotent

    # current_device -> cpu, also outside any mode (called from autograd backward)
    assert torch.cuda.current_device() == torch.device("cpu")
    # factory calls, .to() and .cuda() with CUDA devices land on the CPU
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.empty(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.ones(1, device=0).device.type == "cpu"
    assert torch.ones(2).to("cuda").device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    # the optimizer / clip_grads compare type strings against torch.cuda.FloatTensor
    assert torch.ones(2).type() == "torch.cuda.FloatTensor"
    assert torch.ones(2, dtype=torch.long).type() == "torch.LongTensor"
    # streams and events are no-ops
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        pass
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.Event().record()
    torch.cuda.synchronize()
    # CUDA RNG calls drive the CPU generator
    torch.cuda.manual_seed(7); a = torch.rand(3)
    torch.cuda.manual_seed(7); b = torch.rand(3)
    assert torch.equal(a, b)
    st = torch.cuda.get_rng_state(); c = torch.rand(3); torch.cuda.set_rng_state(st)
    assert torch.equal(c, torch.rand(3))
    from megatron.core.tensor_parallel import random as r
    st = r._get_cuda_rng_state(); c = torch.rand(3); r._set_cuda_rng_state(st)
    assert torch.equal(c, torch.rand(3))
    from megatron.core.transformer.moe import moe_utils
    assert moe_utils.te_general_gemm is None
    # CPU tensors keep working normally
    assert (torch.arange(4) * 2).sum().item() == 12
    print("ALL-OK", len(cpu.REDIRECTIONS))
""")


def test_each_redirection_in_a_fresh_process(tmp_path):
    script = tmp_path / "checks.py"
    script.write_text(CHECKS)
    proc = run_cli([str(script)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ALL-OK 7" in proc.stdout


def test_refuses_to_enable_with_cuda(tmp_path):
    script = tmp_path / "gpu.py"
    script.write_text(textwrap.dedent("""
        import torch
        torch.cuda.is_available = lambda: True
        from megatron_ext.platform import cpu
        assert cpu.enable_if_needed() is False and not cpu.is_enabled()
        try:
            cpu.enable()
        except RuntimeError as e:
            print("REFUSED", e)
    """))
    proc = run_cli([str(script)])
    assert proc.returncode == 0, proc.stderr
    assert "REFUSED" in proc.stdout


@pytest.mark.parametrize("dispatcher", ["allgather"])
def test_megatron_moe_forward_backward_on_cpu(tmp_path, dispatcher):
    script = tmp_path / "fb.py"
    script.write_text(textwrap.dedent(f"""
        import os, torch
        from megatron_ext.platform import cpu
        cpu.enable()
        import torch.distributed as dist
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
        from megatron.core import parallel_state, tensor_parallel
        parallel_state.initialize_model_parallel(1, 1)
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        from megatron_ext.config.loader import load_config
        from megatron_ext.model.builder import build_model, resolve_backends
        cfg = load_config("configs/tiny-cpu.yaml", ["moe.token_dispatcher={dispatcher}",
                                                    "moe.grouped_gemm=false"])
        model = build_model(cfg, resolve_backends(cfg))
        x = torch.randint(0, 4096, (2, 16))
        pos = torch.arange(16).expand(2, -1)
        loss = model(x, pos, None, labels=x).mean()
        loss.backward()
        g = model.decoder.layers[0].mlp.router.weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
        print("FB-OK", float(loss))
    """))
    proc = run_cli([str(script)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FB-OK" in proc.stdout


def test_megatron_fixes_apply_without_the_cpu_path(tmp_path):
    """The fixes are device-independent: init on a GPU box without TE needs them."""
    script = tmp_path / "compat.py"
    script.write_text(textwrap.dedent("""
        from megatron.core.transformer.moe import moe_utils
        from megatron_ext.platform import cpu
        from megatron_ext.platform.compat import apply_megatron_fixes
        assert not hasattr(moe_utils, "te_general_gemm")  # megatron-core 0.16.1 without TE
        from megatron.core.tensor_parallel import CheckpointWithoutOutput
        assert CheckpointWithoutOutput().fp8  # megatron-core 0.16.1: the default means FP8
        assert apply_megatron_fixes() == ["moe_utils.te_general_gemm=None",
                                          "CheckpointWithoutOutput fp8 default"]
        assert moe_utils.te_general_gemm is None and not cpu.is_enabled()
        assert not CheckpointWithoutOutput().fp8 and not CheckpointWithoutOutput(None).fp8
        assert apply_megatron_fixes() == []
        print("COMPAT-OK")
    """))
    proc = run_cli([str(script)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "COMPAT-OK" in proc.stdout
