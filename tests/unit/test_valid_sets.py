"""data.valid_sets: per-domain validation. Each named set reads only its sources' held-out
documents (never a training document), the same samples at every evaluation, and reaches the
metrics as <name>/loss and /ppl beside val_loss; bad sets are one config line, exit 2.
data.blend naming demo languages (a BTX domain branch) trains on those languages only."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import REPO, cpu_megatron_module, run_cli, single_process_megatron

pytestmark = cpu_megatron_module()

from megatron_ext.config.derived import derive  # noqa: E402
from megatron_ext.config.loader import load_config  # noqa: E402
from megatron_ext.platform.dist import Layout  # noqa: E402
from megatron_ext.training.callbacks.validation import evaluate  # noqa: E402
from megatron_ext.training.setup import build_datasets, build_run  # noqa: E402

TINY = str(REPO / "configs" / "tiny-cpu.yaml")
SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
         "moe.num_experts=4", "train.global_batch_size=4", "train.micro_batch_size=2",
         "train.eval_iters=2", "train.eval_interval=5", "train.train_steps=10",
         "schedule.warmup_steps=1", "checkpoint.save=null"]


@pytest.fixture(scope="module", autouse=True)
def model_parallel():
    yield from single_process_megatron(seed=0)


def _indices(dataset) -> set[int]:
    return {int(i) for i in dataset.indices}


def test_named_sets_are_held_out_documents_of_their_language():
    cfg = load_config(TINY, SMALL)
    data = build_datasets(cfg, derive(cfg))  # SMALL: 10 steps
    assert sorted(data.valid_sets) == ["code", "english", "japanese"]
    # The training blend holds one GPTDataset per language; each named set is its language's
    # validation split: the same documents as the blend's held-out part, none of its training ones.
    train_parts = {d.dataset_path.rsplit("/", 1)[-1]: d for d in data.train.datasets}
    valid_parts = {d.dataset_path.rsplit("/", 1)[-1]: d for d in data.valid.datasets}
    for name, language in (("english", "en"), ("japanese", "ja"), ("code", "code")):
        held_out = data.valid_sets[name]
        assert held_out.dataset_path.endswith(f"/{language}") and _indices(held_out)
        assert _indices(held_out) == _indices(valid_parts[language])
        assert not _indices(held_out) & _indices(train_parts[language])


def test_the_same_samples_every_time_and_per_language_losses(tmp_path):
    cfg = load_config(TINY, SMALL + [f"logging.output_dir={tmp_path}"])
    layout = Layout(rank=0, world_size=1, local_rank=0, tensor=1, pipeline=1, expert=1, data=1,
                    device=torch.device("cpu"), backend="gloo")
    run = build_run(cfg, derive(cfg), layout)
    first = {name: evaluate(run, ds) for name, ds in run.valid_sets.items()}
    again = {name: evaluate(run, ds) for name, ds in run.valid_sets.items()}
    assert first == again  # same weights, same samples: the curve moves only with the weights
    # English and Japanese differ for an untrained model on a shared tokenizer.
    assert first["english"] != first["japanese"]


@pytest.mark.parametrize("blend, languages", [
    (["demo:en"], ["en"]), ([1, "demo:ja", 3, "demo:code"], ["code", "ja"])])
def test_a_blend_of_demo_languages_trains_on_those_only(blend, languages):
    cfg = load_config(TINY, SMALL + [f"data.blend={blend}"])
    train = build_datasets(cfg, derive(cfg)).train
    parts = getattr(train, "datasets", [train])  # one language: megatron's plain GPTDataset
    assert sorted(d.dataset_path.rsplit("/", 1)[-1] for d in parts) == languages


def test_a_training_run_logs_every_set(tmp_path):
    args = ["pretrain_moe.py", "--config", "configs/tiny-cpu.yaml"]
    for item in SMALL + [f"logging.output_dir={tmp_path}"]:
        args += ["--set", item]
    proc = run_cli(args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in records if r["kind"] == "valid"]
    assert [r["step"] for r in valid] == [5, 10]
    for record in valid:
        assert {"val_loss", "val_ppl", "english/loss", "english/ppl", "japanese/loss",
                "japanese/ppl", "code/loss", "code/ppl"} <= set(record)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("validation at step 5"))
    assert "english loss" in line and "japanese loss" in line and "code loss" in line


def test_demo_sets_are_not_evaluated_when_training_on_other_data(tmp_path):
    """The demo config switched to mock data (as many tests and benchmarks do) still runs: its
    demo:* sets apply only to the demo corpus (documented in the field), silently skipped."""
    args = ["pretrain_moe.py", "--config", "configs/tiny-cpu.yaml"]
    for item in SMALL + [f"logging.output_dir={tmp_path}", "data.demo_corpus=false",
                         "data.mock=true", "train.train_steps=5"]:
        args += ["--set", item]
    proc = run_cli(args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING" not in proc.stderr
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in records if r["kind"] == "valid"]
    assert valid and all("english/loss" not in r and "val_loss" in r for r in valid)


@pytest.mark.parametrize("override, message", [
    ("data.valid_sets={'bad name': demo:en}", "data.valid_sets: 'bad name': names use letters"),
    ("data.valid_sets={x: []}", "data.valid_sets.x: must be a dataset prefix"),
    ("data.valid_sets=[demo:en]", "data.valid_sets: expected a mapping of names"),
    ("data.split='100,0,0'", "data.valid_sets: data.split '100,0,0' holds out no validation"),
    ("data.blend=[/data/web]", "data.blend: with data.demo_corpus it may name only demo"),
])
def test_bad_sets_are_one_config_line(override, message):
    proc = run_cli(["pretrain_moe.py", "--config", "configs/tiny-cpu.yaml", "--dry-run",
                    "--set", override])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert message in proc.stderr


@pytest.mark.parametrize("override, field", [
    ("data.valid_sets={fr: demo:fr}", "data.valid_sets.fr"),
    ("data.blend=[demo:fr]", "data.blend")])
def test_an_unknown_demo_language_is_one_line(tmp_path, override, field):
    args = ["pretrain_moe.py", "--config", "configs/tiny-cpu.yaml", "--set", override,
            "--set", f"logging.output_dir={tmp_path}"]
    for item in SMALL:
        args += ["--set", item]
    proc = run_cli(args, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {field}: demo:fr is not a demo corpus language "
        "(have demo:code, demo:en, demo:ja)")
