"""``checkpoint.load`` (the upcycled model a paper run starts from) survives the first optimizer
step in bf16: megatron's bf16 optimizer keeps fp32 main copies of the parameters, made when it
is built, and writes them back into the model after every step; weights loaded afterwards must
be copied into them (found by the whole-run parity in bf16: the loaded weights were replaced
by the random init at step 1). A step at learning rate 0 must leave the loaded weights as they
were. (fp32 models on the CPU have no main copies: the bf16 case is the one that can fail.)"""

from __future__ import annotations

import pytest
import torch

from megatron_ext.conversion.mcore_io import read_mcore_checkpoint
from tests.conftest import run_cli, set_args

COMMON = ["--config", "configs/tiny-cpu.yaml", *set_args(
    "data.demo_corpus=false", "data.mock=true", "model.num_layers=2", "model.hidden_size=64",
    "model.ffn_hidden_size=128", "model.vocab_size=512", "data.seq_length=32",
    "train.global_batch_size=4", "train.micro_batch_size=2", "train.eval_interval=0",
    "schedule.warmup_steps=0", "logging.expert_similarity=false")]


@pytest.mark.parametrize("precision", ["bf16"])
def test_loaded_weights_survive_a_step_at_lr_0(tmp_path, precision):
    first = run_cli(["pretrain_moe.py", *COMMON, *set_args(
        "train.train_steps=1", f"train.precision={precision}", f"checkpoint.save={tmp_path}/a",
        f"logging.output_dir={tmp_path}/ra", "train.seed=1")])
    assert first.returncode == 0, first.stderr[-3000:]
    # Another seed: the second run's own random init differs from the loaded weights.
    second = run_cli(["pretrain_moe.py", *COMMON, *set_args(
        "train.train_steps=1", f"train.precision={precision}", "optimizer.lr=0",
        "optimizer.min_lr=0", f"checkpoint.load={tmp_path}/a", f"checkpoint.save={tmp_path}/b",
        f"logging.output_dir={tmp_path}/rb", "train.seed=2")])
    assert second.returncode == 0, second.stderr[-3000:]
    get_a, names, _, _ = read_mcore_checkpoint(tmp_path / "a")
    get_b, _, _, _ = read_mcore_checkpoint(tmp_path / "b")
    assert len(names) > 10
    for name in names:
        assert torch.equal(get_a(name), get_b(name)), name
