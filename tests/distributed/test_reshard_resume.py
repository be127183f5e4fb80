"""A checkpoint saved at one expert-parallel size gives the same model outputs at another,
and training resumes across the change (model and optimizer state reshard).

One module fixture trains the three layouts once (EP=1 = TP=1, EP=2, TP=2) and computes every
layout's logits in two launches (one process, two processes: ``load_model`` replaces the
layout between checkpoints), so each test only adds its resume run."""

import shutil
import textwrap

import pytest
import torch

from tests.conftest import run_cli, torchrun
from tests.resilience import losses_by_step, small_args

LOGITS = textwrap.dedent("""
    import sys, torch
    import torch.distributed as dist
    from megatron_ext.checkpoint.load_model import load_model
    from megatron_ext.model.inference import logits
    from megatron_ext.platform.dist import shutdown
    # Arguments: (checkpoint, ep, tp, output) four at a time, ep * tp = the world size.
    jobs = sys.argv[1:]
    for i in range(0, len(jobs), 4):
        ckpt, ep, tp, out = jobs[i], int(jobs[i + 1]), int(jobs[i + 2]), jobs[i + 3]
        cfg, model = load_model(ckpt, expert_parallel=ep, tensor_parallel=tp)
        tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_length),
                               generator=torch.Generator().manual_seed(0))
        result = logits(model, tokens)
        if dist.get_rank() == 0:
            torch.save(result, out)
    shutdown()
""")
# (saved run, ep, tp) per logits launch: one process, then two.
LOADS = {1: [("one", 1, 1), ("ep2", 1, 1)], 2: [("one", 2, 1), ("ep2", 2, 1), ("one", 1, 2)]}


def _launch(nproc: int, args: list[str]):
    proc = run_cli(args) if nproc == 1 else torchrun(nproc, args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{run: (dir, stdout)} of 3-step runs at EP=1 (= TP=1), EP=2 and TP=2 with sequence
    parallelism, and {(run, ep, tp): logits of its checkpoint at that layout}."""
    tmp = tmp_path_factory.mktemp("reshard")
    runs = {}
    for name, nproc, sets in (("one", 1, ()), ("ep2", 2, ("parallel.expert=2",)),
                              ("tp2", 2, ("parallel.tensor=2", "parallel.sequence_parallel=true"))):
        extra = [a for s in sets for a in ("--set", s)]
        runs[name] = (tmp / name, _launch(nproc, small_args(tmp / name, 3, *extra)).stdout)
    script = tmp / "logits.py"
    script.write_text(LOGITS)
    logits = {}
    for nproc, loads in LOADS.items():
        args = [str(script)]
        for name, ep, tp in loads:
            args += [str(tmp / name / "ckpt"), str(ep), str(tp), str(tmp / f"{name}_{ep}_{tp}.pt")]
        _launch(nproc, args)
        for name, ep, tp in loads:
            logits[name, ep, tp] = torch.load(tmp / f"{name}_{ep}_{tp}.pt", weights_only=True)
    return runs, logits


@pytest.mark.parametrize("save_ep, load_ep", [(1, 2), (2, 1)])
def test_outputs_equal_across_expert_parallel_sizes(tmp_path, saved, save_ep, load_ep):
    runs, logits = saved
    name = "one" if save_ep == 1 else "ep2"
    before, after = logits[name, save_ep, 1], logits[name, load_ep, 1]
    assert before.shape == after.shape
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)

    # Training continues at the new size from the same step, optimizer state included
    # (in a copy: the saved run serves the other tests).
    shutil.copytree(runs[name][0] / "ckpt", tmp_path / "ckpt")
    args = small_args(tmp_path, 5, "--set", f"parallel.expert={load_ep}",
                      "--set", "checkpoint.allow_config_change=true")  # 3 -> 5 steps
    proc = _launch(load_ep, args)
    assert "resumed from" in proc.stdout and "at step 3" in proc.stdout
    assert "step 5/5" in proc.stdout


def test_tensor_parallel_matches_and_reshards(saved):
    """TP=2 (with sequence parallelism, our RMSNorm) trains with the same losses as TP=1 from the
    same CPU-initialized weights, and a TP=1 checkpoint gives the same logits at TP=2."""
    runs, logits = saved
    assert "tp=2" in runs["tp2"][1]
    a, b = losses_by_step(runs["one"][0] / "run"), losses_by_step(runs["tp2"][0] / "run")
    for step in (1, 2, 3):
        assert abs(a[step] - b[step]) <= 1e-5, (a, b)
    torch.testing.assert_close(logits["one", 1, 2], logits["one", 1, 1], rtol=0, atol=1e-5)
