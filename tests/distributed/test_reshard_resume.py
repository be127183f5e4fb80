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
    from megatron_ext.model.inference import load_model, logits
    from megatron_ext.platform.dist import shutdown
    ckpt, ep, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    cfg, model = load_model(ckpt, expert_parallel=ep)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_length),
                           generator=torch.Generator().manual_seed(0))
    result = logits(model, tokens)
    if dist.get_rank() == 0:
        torch.save(result, out)
    shutdown()
""")


def _logits(tmp, ckpt, ep):
    script = tmp / "logits.py"
    script.write_text(LOGITS)
    out = tmp / f"logits_ep{ep}.pt"
    args = [str(script), str(ckpt), str(ep), str(out)]
    proc = run_cli(args) if ep == 1 else torchrun(ep, args)
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
    args = small_args(tmp_path, 5, "--set", f"parallel.expert={load_ep}")
    proc = run_cli(args) if load_ep == 1 else torchrun(load_ep, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "at step 3" in proc.stdout
    assert "step 5/5" in proc.stdout
