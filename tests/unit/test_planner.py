"""The layout planner predicts what was measured and plans what the CLI promises.

- Calibration (issue 18: within 15%): every single-GPU throughput row of our stack recorded in
  docs/benchmarks.md (parsed from the tables, not re-typed) is predicted within 15%, and so is
  the training loop's own measured figure quoted there (a number no constant was fitted to).
- Pipeline messages equal megatron-core's p2p shape (``schedules.get_tensor_shapes``) times the
  1F1B schedule's sends; the bubble and the memory follow the stage split.
- ``pretrain_moe.py --plan --nodes N`` prints one table ranked fits-first by step time, with the
  config's own layout marked; bad usage is one line and exit 2; ``--dry-run`` prints the step.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from megatron_ext.config.loader import load_config
from megatron_ext.config.validate import validate
from megatron_ext.model.params import memory_estimate_gb
from megatron_ext.model.planner.comm import traffic
from megatron_ext.model.planner.costs import Layout
from megatron_ext.model.planner.search import candidates
from megatron_ext.model.planner.step import predict
from megatron_ext.training import dry_run
from tests.conftest import REPO, run_cli

BENCH = REPO / "docs/benchmarks.md"
TOLERANCE = 0.15  # the bound
# tools/bench/throughput.py's step keeps params, grads and Adam state in the model dtype
# (docs/bench/h100-2026-11-23/*.md): read p, g, m, v and write p, m, v in bf16.
BENCH_ADAM_BYTES = 14.0


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n### ", start + 1)
    return text[start:end if end > 0 else None]


def _cells(line: str) -> list[str]:
    return [c.strip().strip("*") for c in line.strip().strip("|").split("|")]


def measured_rows() -> list[dict]:
    """Our stack's single-GPU rows of docs/benchmarks.md's issue-7 throughput tables."""
    text = BENCH.read_text()
    rows = []
    sec = _section(text, "### 8x152M, seq 4096, micro-batch 4")
    for line in sec.splitlines():
        cells = _cells(line)
        if len(cells) < 3 or not cells[0].startswith("ours"):
            continue
        mb = re.search(r"micro-batch (\d+)", cells[0])
        rows.append({"config": "8x152M", "layers": None, "mb": int(mb.group(1)) if mb else 4,
                     "graph": "eager" not in cells[0], "tokens_per_s": _num(cells[1]),
                     "what": cells[0]})
    sec = _section(text, "### 8x1.5B-shaped layers")
    mb = int(re.search(r"micro-batch (\d+)", sec.splitlines()[0]).group(1))
    for line in sec.splitlines():
        cells = _cells(line)
        if len(cells) < 3 or not cells[1].startswith("ours"):
            continue
        rows.append({"config": "8x1.5B", "layers": int(cells[0].split()[0]), "mb": mb,
                     "graph": "graphed" in cells[1], "tokens_per_s": _num(cells[2]),
                     "what": f"{cells[0]} layers, {cells[1]}"})
    return rows


def _num(cell: str) -> float:
    return float(cell.replace(",", ""))


def _single_gpu(name: str, mb: int, graph: bool, layers: int | None, steps_per: int = 1):
    sets = [f"train.micro_batch_size={mb}", f"train.global_batch_size={mb * steps_per}",
            "parallel.world_size=1", "parallel.expert=1", f"train.cuda_graph={str(graph).lower()}"]
    sets += [f"model.num_layers={layers}"] if layers else []
    cfg = load_config(str(REPO / f"configs/{name}.yaml"), sets)
    validate(cfg, 1)
    return cfg


def test_benchmarks_table_parses_to_every_measured_row():
    rows = measured_rows()
    # 4 rows of 8x152M (graphed, eager, mb 8, mb 2) and 5 of the 8x1.5B shape.
    assert len(rows) == 9, rows
    assert {r["graph"] for r in rows} == {True, False}
    assert {r["layers"] for r in rows} == {None, 6, 12, 18}


@pytest.mark.parametrize("row", measured_rows(), ids=lambda r: f"{r['config']}:{r['what']}")
def test_single_gpu_prediction_within_15_percent(row):
    cfg = _single_gpu(row["config"], row["mb"], row["graph"], row["layers"])
    predicted = predict(cfg, 1, adam_bytes=BENCH_ADAM_BYTES).tokens_per_s
    assert abs(predicted / row["tokens_per_s"] - 1) <= TOLERANCE, (predicted, row)


def test_training_loop_figure_within_15_percent():
    """The loop's 8x152M figure (DDP with fp32 grads, distributed optimizer, 2 micro-batches of
    4, graphed): no constant was fitted to it."""
    text = BENCH.read_text()
    found = re.search(r"micro-batch (\d+),\s+(\d+) micro-batches per step.*?\*\*([\d,]+) tokens/s "
                      r"with `train.cuda_graph`", text, re.S)
    mb, per_step, measured = int(found.group(1)), int(found.group(2)), _num(found.group(3))
    cfg = _single_gpu("8x152M", mb, True, None, steps_per=per_step)
    assert abs(predict(cfg, 1).tokens_per_s / measured - 1) <= TOLERANCE


def _paper(name: str, sets: list[str]):
    cfg = load_config(str(REPO / f"configs/{name}.yaml"), sets)
    return cfg


@pytest.mark.parametrize("tp,pp,mb,first,last", [(1, 2, 1, True, False), (1, 2, 2, False, True),
                                                 (2, 4, 1, False, False), (4, 2, 2, True, False)])
def test_pipeline_messages_match_megatron_p2p_shape(tp, pp, mb, first, last):
    from megatron.core.pipeline_parallel.schedules import get_tensor_shapes  # why: megatron

    cfg = _paper("8x1.5B", [f"parallel.tensor={tp}", f"parallel.pipeline={pp}",
                            f"parallel.sequence_parallel={tp > 1}", f"train.micro_batch_size={mb}",
                            "parallel.expert=1", "parallel.world_size=64"])
    lay = Layout.of(cfg, 64)
    size = SimpleNamespace(size=lambda n=tp: n)
    (shape,) = get_tensor_shapes(
        seq_length=cfg.data.seq_length, micro_batch_size=mb, decoder_seq_length=None,
        config=SimpleNamespace(sequence_parallel=tp > 1, hidden_size=cfg.model.hidden_size),
        tp_group=size, cp_group=SimpleNamespace(size=lambda: 1))
    # 1F1B: every micro-batch's output goes forward from all but the last stage and its input
    # gradient backward from all but the first; bf16.
    sends = lay.micro_batches * ((not last) + (not first))
    (pp_msgs,) = [t for t in traffic(cfg, lay, 6, 6, first, last, 2, 2) if t.dim == "pp"]
    assert pp_msgs.bytes == sends * shape[0] * shape[1] * shape[2] * 2


def test_bubble_and_stage_memory_follow_the_pipeline():
    base = ["parallel.expert=1", "parallel.world_size=32", "train.micro_batch_size=2"]
    one = _paper("8x1.5B", base)
    two = _paper("8x1.5B", base + ["parallel.pipeline=2"])
    p1, p2 = predict(one, 32), predict(two, 32)
    assert p1.bubble == 0 and p2.bubble > 0
    # (p - 1) stage-micro-batches of a step of m: the bubble's share of the pipelined compute.
    assert p2.bubble / p2.compute == pytest.approx(1 / p2.layout.micro_batches, rel=0.05)
    m1, m2 = memory_estimate_gb(one, 32), memory_estimate_gb(two, 32)
    assert m2["weights"] < 0.6 * m1["weights"]  # half the layers (and one embedding table)


def test_expert_all_to_all_slows_when_its_group_leaves_the_node():
    sets = ["parallel.expert=8", "parallel.world_size=32", "train.micro_batch_size=2"]
    four = _paper("8x1.5B", sets)
    eight = _paper("8x1.5B", sets + ["cluster.gpus_per_node=8"])
    assert predict(eight, 32).comm["ep"] < predict(four, 32).comm["ep"] / 3


def test_candidates_rank_fitting_layouts_first_by_step_time():
    cfg = _paper("8x152M", [])
    found = candidates(cfg, 2)
    fits = [c.fits for c in found]
    assert fits == sorted(fits, reverse=True) and any(fits)
    steps = [c.prediction.step_s for c in found if c.fits]
    assert steps == sorted(steps)
    assert sum(c.configured for c in found) == 1


def test_plan_cli_prints_one_ranked_table():
    r = run_cli(["pretrain_moe.py", "--config", "configs/8x152M.yaml", "--plan", "--nodes", "2"])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    rows = [ln for ln in lines if re.match(r"\s*(\d+|cfg)\*?\s+\d", ln)]
    assert 1 <= len(rows) <= 11 and sum("*" in ln.split()[0] for ln in rows) == 1
    steps = [float(ln.split("|")[0].split()[11]) for ln in rows if not ln.strip().startswith("cfg")]
    assert steps == sorted(steps)
    assert "8 GPUs" in lines[0] and "days" in r.stdout


@pytest.mark.parametrize("args,what", [
    (["--plan"], "--plan needs --nodes"), (["--plan", "--nodes", "0"], "--nodes: must be >= 1"),
    (["--nodes", "2"], "--nodes and --plan-all go with --plan"),
    (["--plan", "--nodes", "2", "--set", "cluster.gpus_per_node=0"], "cluster.gpus_per_node"),
    (["--plan", "--nodes", "5"], "--nodes 5: no layout of 20 GPUs is valid"),  # 512 over 20
])
def test_plan_usage_errors_are_one_line_exit_2(args, what):
    r = run_cli(["pretrain_moe.py", "--config", "configs/8x152M.yaml", *args])
    assert r.returncode == 2 and what in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_dry_run_prints_the_configured_layouts_step(capsys):
    cfg = _paper("8x1.5B", ["model.num_layers=2"])
    validate(cfg, cfg.parallel.world_size)
    assert dry_run.main(cfg) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("predicted step"))
    assert "on 8 node(s) of 4x H100-SXM" in line and "ep " in line and "days for 500.0B" in line
