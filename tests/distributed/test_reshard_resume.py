"""A checkpoint saved at one expert-parallel size gives the same model outputs at another,
and training resumes across the change (model and optimizer state reshard)."""

import textwrap

import pytest
import torch

from tests.conftest import run_cli, torchrun
from tests.resilience import small_args

LOGITS = textwrap.dedent("""
    import sys, torch
    import torch.distributed as dist
    from megatron_ext.checkpoint.load_model import load_model
    from megatron_ext.model.inference import logits
    from megatron_ext.platform.dist import shutdown
    ckpt, ep, tp, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    cfg, model = load_model(ckpt, expert_parallel=ep, tensor_parallel=tp)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_length),
                           generator=torch.Generator().manual_seed(0))
    result = logits(model, tokens)
    if dist.get_rank() == 0:
        torch.save(result, out)
    shutdown()
""")


def _logits(tmp, ckpt, ep, tp=1):
    script = tmp / "logits.py"
    script.write_text(LOGITS)
    out = tmp / f"logits_ep{ep}_tp{tp}.pt"
    args = [str(script), str(ckpt), str(ep), str(tp), str(out)]
    proc = run_cli(args) if ep * tp == 1 else torchrun(ep * tp, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("save_ep, load_ep", [(1, 2), (2, 1)])
def test_outputs_equal_across_expert_parallel_sizes(tmp_path, save_ep, load_ep):
    args = small_args(tmp_path, 3, "--set", f"parallel.expert={save_ep}")
    proc = run_cli(args) if save_ep == 1 else torchrun(save_ep, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "ckpt"
    before = _logits(tmp_path, ckpt, save_ep)
    after = _logits(tmp_path, ckpt, load_ep)
    assert before.shape == after.shape
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)

    # Training continues at the new size from the same step, optimizer state included.
    args = small_args(tmp_path, 5, "--set", f"parallel.expert={load_ep}",
                      "--set", "checkpoint.allow_config_change=true")  # 3 -> 5 steps
    proc = run_cli(args) if load_ep == 1 else torchrun(load_ep, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "at step 3" in proc.stdout
    assert "step 5/5" in proc.stdout


def test_tensor_parallel_matches_and_reshards(tmp_path):
    """TP=2 (with sequence parallelism, our RMSNorm) trains with the same losses as TP=1 from the
    same CPU-initialized weights, and a TP=1 checkpoint gives the same logits at TP=2."""
    base = small_args(tmp_path / "a", 3, "--set", "checkpoint.save_interval=3")
    one = run_cli(base)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(2, small_args(tmp_path / "b", 3, "--set", "parallel.tensor=2",
                                 "--set", "parallel.sequence_parallel=true"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "tp=2" in two.stdout
    from tests.resilience import losses_by_step

    a, b = losses_by_step(tmp_path / "a/run"), losses_by_step(tmp_path / "b/run")
    for step in (1, 2, 3):
        assert abs(a[step] - b[step]) <= 1e-5, (a, b)
    before = _logits(tmp_path, tmp_path / "a/ckpt", 1, 1)
    after = _logits(tmp_path, tmp_path / "a/ckpt", 1, 2)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
