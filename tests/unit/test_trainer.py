"""The trainer and its callbacks (megatron_ext.training.trainer, .callbacks): the named points
are called in order, on the steps the config says; a callback's metrics reach the sinks; a
failure anywhere closes every callback as aborted and propagates. A real tiny model on CPU."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import cpu_megatron_module, single_process_megatron

pytestmark = cpu_megatron_module()

from megatron_ext.checkpoint.store import TrainState  # noqa: E402
from megatron_ext.config.derived import derive  # noqa: E402
from megatron_ext.config.loader import load_config  # noqa: E402
from megatron_ext.platform.dist import Layout  # noqa: E402
from megatron_ext.training.callbacks import Callback, MetricsLogger, Throughput  # noqa: E402
from megatron_ext.training.callbacks.validation import Validation  # noqa: E402
from megatron_ext.training.cuda_graph import StepRunner  # noqa: E402
from megatron_ext.training.loggers import MetricsWriter  # noqa: E402
from megatron_ext.training.setup import build_run  # noqa: E402
from megatron_ext.training.trainer import Trainer  # noqa: E402

STEPS = 6
CONFIG = [
    "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
    "model.ffn_hidden_size=64", "model.vocab_size=128", "model.max_position_embeddings=16",
    "moe.num_experts=4", "train.precision=fp32", "data.mock=true", "data.seq_length=16",
    "train.global_batch_size=4", "train.micro_batch_size=2", f"train.train_steps={STEPS}",
    "train.log_interval=4", "train.eval_interval=3", "train.eval_iters=1",
    "schedule.warmup_steps=1", "train.peak_tflops=1",
]


@pytest.fixture(scope="module", autouse=True)
def model_parallel():
    yield from single_process_megatron(seed=0)


class Recorder(Callback):
    def __init__(self, fail_at: int | None = None):
        self.events: list[tuple] = []
        self.fail_at = fail_at

    def on_start(self, trainer):
        self.events.append(("start", trainer.state.step))

    def on_step_end(self, trainer):
        self.events.append(("step_end", trainer.state.step))
        if trainer.state.step == self.fail_at:
            raise RuntimeError("a callback failed")

    def on_log(self, trainer, metrics):
        assert "tokens_per_s" in metrics  # Throughput, earlier in the list, added its metrics
        metrics["recorder/step"] = trainer.state.step
        self.events.append(("log", trainer.state.step))

    def on_eval(self, trainer, metrics):
        self.events.append(("eval", trainer.state.step, sorted(metrics)))

    def on_end(self, trainer):
        self.events.append(("end", trainer.status))

    def close(self, trainer, aborted):
        self.events.append(("close", aborted))


def _trainer(tmp_path, recorder: Recorder) -> tuple[Trainer, MetricsWriter]:
    cfg = load_config(None, CONFIG + [f"logging.output_dir={tmp_path}"])
    layout = Layout(rank=0, world_size=1, local_rank=0, tensor=1, pipeline=1, expert=1, data=1,
                    device=torch.device("cpu"), backend="gloo")
    run = build_run(cfg, derive(cfg), layout)
    writer = MetricsWriter(cfg.logging, tmp_path, {}, "test", enabled=True)
    callbacks = [Throughput(run), recorder, MetricsLogger(writer), Validation(run)]
    return Trainer(run, TrainState(), callbacks, StepRunner()), writer


def test_named_points_in_order_and_metrics_reach_the_sinks(tmp_path):
    recorder = Recorder()
    trainer, writer = _trainer(tmp_path, recorder)
    code, summary = trainer.fit()
    writer.close()
    assert code == 0 and summary.status == "completed" and summary.steps == STEPS
    # Validation after step 3 and 6 (eval_interval 3); log at step 4 and at the last step.
    # Recorder sits before MetricsLogger: its step_end comes first, then the logging step's
    # on_log, then validation's on_eval.
    assert recorder.events == [
        ("start", 0), ("step_end", 1), ("step_end", 2), ("step_end", 3),
        ("eval", 3, ["val_loss", "val_ppl"]), ("step_end", 4), ("log", 4), ("step_end", 5),
        ("step_end", 6), ("log", 6), ("eval", 6, ["val_loss", "val_ppl"]),
        ("end", "completed"), ("close", False),
    ]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [4, 6]
    assert [r["recorder/step"] for r in train] == [4, 6]
    assert [r["step"] for r in records if r["kind"] == "valid"] == [3, 6]
    assert summary.first_loss is not None and summary.last_loss < summary.first_loss * 1.5


def test_a_failing_callback_closes_every_callback_as_aborted(tmp_path):
    recorder = Recorder(fail_at=2)
    trainer, writer = _trainer(tmp_path, recorder)
    with pytest.raises(RuntimeError, match="a callback failed"):
        trainer.fit()
    writer.close()
    assert recorder.events[-1] == ("close", True)
    assert ("end", "completed") not in recorder.events
    assert trainer.state.step == 2


def test_a_model_trained_earlier_in_the_process_leaves_no_state_behind(tmp_path):
    """megatron keeps MoE state per process (the aux-loss gradient scale, 0-d once a backward
    ran outside the schedule; the per-layer tracker). A run after another model in the same
    process (tests, evaluation and experiment tools) must not inherit it (build_model resets)."""
    trainer, writer = _trainer(tmp_path / "first", Recorder())
    model = trainer.run.model
    tokens = torch.randint(0, 128, (2, 17))
    position_ids = torch.arange(16).expand(2, 16)
    model(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:]).mean().backward()
    writer.close()
    recorder = Recorder()
    trainer, writer = _trainer(tmp_path / "second", recorder)
    code, summary = trainer.fit()
    writer.close()
    assert code == 0 and summary.steps == STEPS and recorder.events[-1] == ("close", False)
