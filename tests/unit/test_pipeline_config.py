"""Pipeline layouts are checked before any process group exists: every stage and every virtual
stage (model chunk) gets a whole number of layers, at least one; interleaving needs a pipeline
and micro-batches in multiples of it; CUDA graphs are refused with a pipeline. Each fault is one
line naming the field, exit 2 from the CLI."""

from __future__ import annotations

import pytest

from megatron_ext.config.derived import pipeline_stage_layers
from megatron_ext.config.loader import ConfigError, load_config
from megatron_ext.config.validate import validate
from tests.conftest import REPO, run_cli

TINY = REPO / "configs/tiny-cpu.yaml"  # 4 layers, global batch 16, micro-batch 8


def _cfg(*overrides: str):
    return load_config(TINY, list(overrides))


@pytest.mark.parametrize("overrides, stages", [
    (["parallel.pipeline=2", "parallel.world_size=2"], [2, 2]),
    (["parallel.pipeline=4", "parallel.world_size=4"], [1, 1, 1, 1]),
    (["parallel.pipeline=2", "parallel.first_stage_layers=1", "parallel.world_size=2"], [1, 3]),
    (["parallel.pipeline=2", "parallel.last_stage_layers=3", "parallel.world_size=2"], [1, 3]),
    (["parallel.pipeline=3", "parallel.first_stage_layers=1", "parallel.last_stage_layers=1",
      "model.num_layers=6", "parallel.world_size=3"], [1, 4, 1]),
    (["parallel.pipeline=2", "parallel.virtual_pipeline=2", "train.micro_batch_size=4",
      "parallel.world_size=2"], [2, 2]),
    (["parallel.pipeline=2", "parallel.tensor=2", "parallel.sequence_parallel=true",
      "parallel.expert=2", "parallel.world_size=8"], [2, 2]),
])
def test_pipeline_layouts_that_work(overrides, stages):
    cfg = _cfg(*overrides)
    validate(cfg)
    assert pipeline_stage_layers(cfg.parallel, cfg.model.num_layers) == stages


@pytest.mark.parametrize("overrides, message", [
    (["parallel.pipeline=3", "parallel.world_size=3"],
     "parallel.pipeline: model.num_layers (4) must split into 3 stage(s) x virtual_pipeline=1"),
    (["parallel.pipeline=8", "parallel.world_size=8"], "parallel.pipeline: model.num_layers (4)"),
    (["parallel.virtual_pipeline=2"], "parallel.virtual_pipeline: needs parallel.pipeline > 1"),
    (["parallel.first_stage_layers=1"], "parallel.first_stage_layers: needs parallel.pipeline"),
    (["parallel.last_stage_layers=1"], "parallel.last_stage_layers: needs parallel.pipeline > 1"),
    (["parallel.pipeline=2", "parallel.virtual_pipeline=4", "parallel.world_size=2"],
     "parallel.pipeline: model.num_layers (4) must split into 2 stage(s) x virtual_pipeline=4"),
    (["parallel.pipeline=2", "parallel.virtual_pipeline=2", "train.micro_batch_size=16",
      "parallel.world_size=2"],
     "parallel.virtual_pipeline: the interleaved schedule needs micro-batches per step (1) to "
     "be a multiple of pipeline=2"),
    (["parallel.pipeline=2", "parallel.virtual_pipeline=2", "parallel.first_stage_layers=1",
      "train.micro_batch_size=4", "parallel.world_size=2"],
     "parallel.first_stage_layers: 1 is not divisible by virtual_pipeline=2"),
    (["parallel.pipeline=2", "parallel.first_stage_layers=4", "parallel.world_size=2"],
     "parallel.first_stage_layers: the layers left by first/last_stage_layers (0)"),
    (["parallel.pipeline=2", "parallel.first_stage_layers=1", "parallel.last_stage_layers=2",
      "parallel.world_size=2"], "parallel.first_stage_layers: first_stage_layers + "
                                "last_stage_layers = 3 must equal model.num_layers=4"),
    (["parallel.pipeline=2", "parallel.world_size=3"],
     "parallel.tensor: world size 3 is not divisible by tensor*pipeline=2"),
    (["parallel.virtual_pipeline=0"], "parallel.virtual_pipeline: must be >= 1"),
    (["parallel.pipeline=2", "parallel.world_size=2", "train.cuda_graph=true"],
     "train.cuda_graph: cannot be combined with pipeline parallelism"),
])
def test_bad_pipeline_layouts_name_the_field(overrides, message):
    with pytest.raises(ConfigError) as e:
        validate(_cfg(*overrides))
    assert message in str(e.value)


def test_cli_refuses_a_bad_pipeline_layout_in_one_line(tmp_path):
    proc = run_cli(["pretrain_moe.py", "--config", str(TINY), "--set", "parallel.pipeline=2",
                    "--set", "parallel.virtual_pipeline=3",
                    "--set", f"logging.output_dir={tmp_path}/run"])
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("config error: parallel.pipeline:"), lines
    assert not (tmp_path / "run").exists()
