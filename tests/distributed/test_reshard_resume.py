"""A checkpoint saved at one expert-parallel size gives the same model outputs at another,
and training resumes across the change (model and optimizer state reshard).

One module fixture does every launch once, all forked from one driver (tests.forkrun: one
import of torch and megatron for the lot, two-rank launches included): a 3-step run at EP=1
(= TP=1) that resumes at EP=2 to step 5, which resumes at EP=1 to step 7 (each resume from the
other size's checkpoint; the three share one checkpoint root, which keeps all three); a 3-step
run at TP=2; the logits of every checkpoint at every layout, in two launches (one process, two
processes: ``load_model`` replaces the layout between checkpoints)."""

import textwrap

import pytest
import torch

from tests.forkrun import run_clis
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
# (saved run, ep, tp) per logits launch: one process, then two. "ep2" is the EP=1 run resumed
# at EP=2: its checkpoint was saved at EP=2.
LOADS = {1: [("one", 1, 1), ("ep2", 1, 1)], 2: [("one", 2, 1), ("ep2", 2, 1), ("one", 1, 2)]}
RESUMED = "resumed from"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{run: (dir, stdout)} of "one" (EP=1), "ep2" (it resumed at EP=2), "ep1" (that resumed
    at EP=1) and "tp2" (TP=2 with sequence parallelism), and {(run, ep, tp): logits of its
    checkpoint at that layout}."""
    tmp = tmp_path_factory.mktemp("reshard")
    root = ["--set", f"checkpoint.save={tmp}/ckpt"]  # one, ep2, ep1: iter_3, iter_5, iter_7
    resume = ["--set", "checkpoint.allow_config_change=true"]
    runs = {"one": (small_args(tmp / "one", 3, *root), 1),
            "ep2": (small_args(tmp / "ep2", 5, *root, *resume, "--set", "parallel.expert=2"), 2),
            "ep1": (small_args(tmp / "ep1", 7, *root, *resume, "--set", "parallel.expert=1"), 1),
            "tp2": (small_args(tmp / "tp2", 3, "--set", "parallel.tensor=2",
                               "--set", "parallel.sequence_parallel=true"), 2)}
    script = tmp / "logits.py"
    script.write_text(LOGITS)
    calls = [(args, n) for args, n in runs.values()]
    for nproc, loads in LOADS.items():
        args = [str(script)]
        for name, ep, tp in loads:
            ckpt = tmp / "tp2" / "ckpt" if name == "tp2" else tmp / "ckpt"
            args += [str(ckpt / ("iter_0000005" if name == "ep2" else "iter_0000003")), str(ep),
                     str(tp), str(tmp / f"{name}_{ep}_{tp}.pt")]
        calls.append((args, nproc))
    procs = run_clis([c for c, _ in calls], tmp / "driver", nprocs=[n for _, n in calls])
    for proc in procs:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    logits = {key: torch.load(tmp / "{}_{}_{}.pt".format(*key), weights_only=True)
              for loads in LOADS.values() for key in loads}
    return {name: (tmp / name, proc.stdout) for name, proc in zip(runs, procs)}, logits


@pytest.mark.parametrize("save_ep, load_ep", [(1, 2), (2, 1)])
def test_outputs_equal_across_expert_parallel_sizes(saved, save_ep, load_ep):
    runs, logits = saved
    name = "one" if save_ep == 1 else "ep2"
    before, after = logits[name, save_ep, 1], logits[name, load_ep, 1]
    assert before.shape == after.shape
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)

    # Training continued at the new size from the same step, optimizer state included.
    out = runs["ep2" if load_ep == 2 else "ep1"][1]
    steps = 5 if load_ep == 2 else 7
    assert f"ep={load_ep}" in out and RESUMED in out and f"at step {steps - 2}" in out, out[-2000:]
    assert f"step {steps}/{steps}" in out


def test_tensor_parallel_matches_and_reshards(saved):
    """TP=2 (with sequence parallelism, our RMSNorm) trains with the same losses as TP=1 from the
    same CPU-initialized weights, and a TP=1 checkpoint gives the same logits at TP=2."""
    runs, logits = saved
    assert "tp=2" in runs["tp2"][1]
    a, b = losses_by_step(runs["one"][0] / "run"), losses_by_step(runs["tp2"][0] / "run")
    for step in (1, 2, 3):
        assert abs(a[step] - b[step]) <= 1e-5, (a, b)
    torch.testing.assert_close(logits["one", 1, 2], logits["one", 1, 1], rtol=0, atol=1e-5)
