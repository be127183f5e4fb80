"""The planner's communication volumes are megatron-core's: real gloo runs of ``pretrain_moe.py``
count the bytes every torch.distributed collective is handed in a steady step
(tests/distributed/comm_counter.py), 4 ranks each: TP=2 with sequence parallelism x DP=2 with
EP=2 over the data-parallel ranks (alltoall dispatcher, distributed optimizer), and PP=2 x DP=2
(1F1B, no distributed optimizer). Each kind of message the planner models (TP all-gather /
reduce-scatter, EP all-to-all, DP gradient reduce-scatter and parameter all-gather or
all-reduce, PP sends) must equal its formula, and every kind above 1% of the bytes must be one
it models.

Both runs are forked from one driver (tests.forkrun: one import of torch and megatron for the
eight ranks). comm_counter wraps the collectives in each forked rank, after megatron's import:
megatron looks them up on ``torch.distributed`` at call time, and a missed kind fails the test.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from megatron_ext.config.loader import load_config
from megatron_ext.config.validate import validate
from megatron_ext.model.planner.step import predict, volumes
from tests.conftest import REPO
from tests.forkrun import run_clis

pytestmark = pytest.mark.slow

MODEL = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
    "model.num_kv_heads=2", "model.ffn_hidden_size=128", "model.vocab_size=256",
    "moe.num_experts=4", "moe.top_k=2", "moe.token_dispatcher=alltoall",
    "data.seq_length=32", "train.global_batch_size=8", "train.micro_batch_size=2",
    "train.train_steps=2", "schedule.warmup_steps=0", "train.eval_interval=0",
    "train.precision=fp32", "logging.expert_similarity=false",
    "data.mock=true", "data.demo_corpus=false", "data.valid_sets={}",
]
# (TP, PP, DP, EP, distributed optimizer): every dimension, and both DP reductions.
LAYOUTS = {"tp2-dp2-ep2-distopt": (2, 1, 2, 2, True), "pp2-dp2-allreduce": (1, 2, 2, 1, False)}
OPS = {"all_gather_into_tensor": "all_gather", "all_gather": "all_gather",
       "reduce_scatter_tensor": "reduce_scatter", "reduce_scatter": "reduce_scatter",
       "all_to_all_single": "all_to_all", "all_reduce": "all_reduce", "send": "p2p"}
SMALL = 0.01  # kinds under 1% of the bytes (losses, grad norms, norm/router grads) aside


def _dim(ranks: tuple[int, ...], op: str, tp: int, dp: int) -> str:
    """The dimension a group spans, in megatron's "tp-cp-ep-dp-pp" rank order (rank = t + tp
    (d + dp p)); expert parallelism runs over data-parallel ranks and sends all-to-alls."""
    coords = [(r % tp, r // tp % dp, r // (tp * dp)) for r in ranks]
    varies = [len({c[i] for c in coords}) > 1 for i in range(3)]
    if varies == [True, False, False]:
        return "tp"
    if varies == [False, True, False]:
        return "ep" if op == "all_to_all" else "dp"
    if varies == [False, False, True]:
        return "pp"
    return "world"  # scalars only


def _measured(out, world: int, tp: int, dp: int) -> tuple[dict[str, float], float]:
    """Mean message bytes per rank by ``dim op`` over groups of more than one rank (sends for
    point-to-point), and the total of all of them."""
    per_kind: dict[str, float] = defaultdict(float)
    for rank in range(world):
        for row in json.loads((out / f"rank{rank}.json").read_text()):
            ranks, op = tuple(row["ranks"]), OPS.get(row["kind"], row["kind"])
            if op == "p2p":
                per_kind["pp p2p"] += row["bytes"] / world
            elif len(ranks) > 1:  # one-rank groups move nothing; receives mirror the sends
                per_kind[f"{_dim(ranks, op, tp, dp)} {op}"] += row["bytes"] / world
    return per_kind, sum(per_kind.values())


def _sets(tp: int, pp: int, dp: int, ep: int, dist: bool) -> list[str]:
    return MODEL + [f"parallel.tensor={tp}", f"parallel.sequence_parallel={tp > 1}",
                    f"parallel.pipeline={pp}", f"parallel.expert={ep}",
                    f"parallel.distributed_optimizer={dist}",
                    f"parallel.world_size={tp * pp * dp}"]


@pytest.fixture(scope="module")
def counts(tmp_path_factory) -> dict[str, Path]:
    """{layout: the directory of its ranks' counts}, every layout's run in one driver."""
    tmp = tmp_path_factory.mktemp("comm")
    calls, envs, nprocs = [], [], []
    for name, (tp, pp, dp, ep, dist) in LAYOUTS.items():
        (tmp / name).mkdir()
        args = [str(REPO / "tests/distributed/comm_counter.py"), "--config",
                str(REPO / "configs/tiny-cpu.yaml"), "--set", "checkpoint.save=null",
                "--set", f"logging.output_dir={tmp / name / 'run'}"]
        for s in _sets(tp, pp, dp, ep, dist):
            args += ["--set", s]
        calls.append(args)
        envs.append({"COMM_COUNT_DIR": str(tmp / name)})
        nprocs.append(tp * pp * dp)
    procs = run_clis(calls, tmp / "driver", envs=envs, nprocs=nprocs, timeout=600)
    for name, proc in zip(LAYOUTS, procs):
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
    return {name: tmp / name for name in LAYOUTS}


@pytest.mark.parametrize("name", LAYOUTS)
def test_counted_collectives_match_the_planner(counts, name):
    tp, pp, dp, ep, dist = LAYOUTS[name]
    world = tp * pp * dp
    sets = _sets(tp, pp, dp, ep, dist)
    measured, total = _measured(counts[name], world, tp, dp)
    big = {kind: got for kind, got in measured.items() if got >= SMALL * total}

    cfg = load_config(str(REPO / "configs/tiny-cpu.yaml"), sets)
    validate(cfg, world)
    planned: dict[str, float] = defaultdict(float)
    for kind, size in volumes(predict(cfg, world)).items():
        # Dense and expert gradients: two groups that only differ when EP > 1 (then, here, the
        # expert group has one rank and moves nothing).
        planned[kind.replace("edp ", "dp ")] += size
    assert set(planned) == set(big), (planned, measured)
    for kind, got in big.items():
        # megatron pads the DP buffers (here 64 parameters, 0.2%), the DP group's all-reduce
        # also carries the loss and grad norm, and the planner gives every pipeline stage the
        # parameters of the larger one (one embedding table and the final norm apart); TP, EP
        # and PP messages are exact.
        assert planned[kind] == pytest.approx(got, rel=5e-3 if "dp" in kind else 1e-9), (
            kind, planned, measured)
    assert sum(measured.values()) - sum(big.values()) < 2 * SMALL * total
