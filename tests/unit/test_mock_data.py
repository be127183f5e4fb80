"""No silent random data (issue 25.3).

Guarantees shown:
* a run on mock data (data.mock: true) says so in its first line, ends every later console line
  in ``| MOCK DATA`` and tags its W&B run (offline here) ``mock-data``;
* the config.yaml moe-hf-to-mcore writes has no data section unless --config gives one: no
  mock data, no datasets, and pretrain_moe.py refuses to train from it with one line and exit
  2; with --config (and --set) the run's data section is carried over;
* ``config_from_hf`` (shared with moe-upcycle's mcore output) takes the data section it is given.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, run_cli
from tests.resilience import small_args
from tests.unit.test_wandb_offline import read_wandb_records

HF_TO_MCORE = ["-m", "megatron_ext.cli.hf_to_mcore"]
SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=512)


def test_mock_run_is_marked_on_every_line_and_in_wandb(tmp_path: Path) -> None:
    proc = run_cli(small_args(tmp_path, 2, "--set", "schedule.warmup_steps=1",
                              "--set", "logging.wandb.mode=offline"),
                   env={"WANDB_DIR": str(tmp_path / "wandb_dir"), "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("MOCK DATA: training on random tokens (data.mock: true)")
    assert "ln(vocab) = 6.24" in lines[0]  # model.vocab_size 512
    assert all(line.endswith(" | MOCK DATA") for line in lines[1:]), lines
    assert any(line.startswith("step 2/2 |") for line in lines)  # lines still start as before
    # WANDB_DIR names logging.wandb.dir (the environment overrides the config file)
    wandb_file = next((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*/run-*.wandb"))
    run = next(r.run for r in read_wandb_records(wandb_file)
               if r.WhichOneof("record_type") == "run")
    assert "mock-data" in run.tags


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("mock_data") / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SHAPE)).save_pretrained(out)
    return out


def test_converted_config_has_no_data_and_training_refuses(llama: Path, tmp_path: Path) -> None:
    proc = run_cli([*HF_TO_MCORE, "--input", str(llama), "--output", str(tmp_path / "mc"),
                    "--skip-validation"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "has no training data" in proc.stdout and "--config RUN.yaml" in proc.stdout
    data = yaml.safe_load((tmp_path / "mc" / "config.yaml").read_text())["data"]
    assert (data["mock"], data["blend"], data["tokenizer"], data["demo_corpus"]) == (
        False, [], None, False)
    train = run_cli(["pretrain_moe.py", "--config", str(tmp_path / "mc" / "config.yaml"),
                     "--set", f"checkpoint.load={tmp_path / 'mc'}",
                     "--set", f"logging.output_dir={tmp_path / 'run'}"])
    assert train.returncode == 2 and train.stdout == ""
    assert train.stderr.count("\n") == 1 and "data.blend: empty: no training data" in train.stderr


def test_converter_carries_the_data_section_of_config(llama: Path, tmp_path: Path) -> None:
    proc = run_cli([*HF_TO_MCORE, "--input", str(llama), "--output", str(tmp_path / "mc"),
                    "--skip-validation", "--config", "configs/tiny-cpu.yaml",
                    "--set", "data.seq_length=64"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train from it: pretrain_moe.py" in proc.stdout
    data = yaml.safe_load((tmp_path / "mc" / "config.yaml").read_text())["data"]
    run = yaml.safe_load((REPO / "configs" / "tiny-cpu.yaml").read_text())["data"]
    assert data["demo_corpus"] is True and data["mock"] is False and data["seq_length"] == 64
    assert data["valid_sets"] == run["valid_sets"] and data["split"] == run["split"]
    bad = run_cli([*HF_TO_MCORE, "--input", str(llama), "--output", str(tmp_path / "x"),
                   "--set", "data.seq_length=64"])
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --set needs --config"


def test_config_from_hf_takes_the_given_data_section(llama: Path) -> None:
    from megatron_ext.config.schema import DataConfig
    from megatron_ext.conversion.mcore_io import config_from_hf

    hf = json.loads((llama / "config.json").read_text())
    unset = config_from_hf(hf).data
    assert not unset.mock and not unset.demo_corpus and unset.blend == []
    given = DataConfig(mock=False, blend=[1.0, "a"], tokenizer="tok")
    cfg = config_from_hf(hf, data=given)
    assert cfg.data == given and cfg.data is not given
