"""compare_inits.py from the other kinds of dense base and launch, end to end (real
subprocesses, a tiny model, two steps):

* an HF directory as ``--dense`` (upcycled straight from safetensors), with the trainings
  launched by torchrun on two processes (``--nproc-per-node 2``);
* btx from a dense base the tool trains itself: one branch per demo domain, each trained on
  its own domain only, then mixed with the base by the upcycler.

(The shortened comparison with every report check is in test_compare_inits.py; these run in a
file of their own so that the two pytest workers share the load.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_ext.config.loader import load_config
from megatron_ext.experiments.report import read_metrics
from tests.conftest import run_cli
from tests.unit.test_compare_inits import TOKENS_PER_STEP, compare

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_dense(tmp_path_factory) -> Path:
    """A dense Llama of the shape the shortened comparison's config describes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("hf") / "dense"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=4096, max_position_embeddings=256,
        tie_word_embeddings=False)).save_pretrained(path)
    return path


def test_hf_dense_base_with_trainings_under_torchrun(hf_dense: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    proc = run_cli(compare(out, "--nproc-per-node", "2", "--set", "train.micro_batch_size=4",
                           methods="naive", steps=2, dense=["--dense", str(hf_dense)]))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    stages = {s["name"]: s for s in json.loads((out / "stages.json").read_text())["stages"]}
    assert list(stages) == ["init/naive", "train/naive", "routing/naive"]
    assert stages["init/naive"]["command"][stages["init/naive"]["command"].index("--input") + 1] \
        == str(hf_dense)
    assert stages["train/naive"]["command"][:5] == [
        "python", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert stages["routing/naive"]["command"][:3] == ["python", "-m", "megatron_ext.cli.routing"]
    assert "world=2" in (out / "logs" / "train_naive.log").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["methods"]["naive"]["final"]["cos_first"] > 0.98  # copies of the HF MLP


def test_btx_branches_each_domain_then_mixes(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    proc = run_cli(compare(out, "--btx-tokens", str(2 * TOKENS_PER_STEP), methods="btx",
                           steps=2))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    stages = json.loads((out / "stages.json").read_text())["stages"]
    assert [s["name"] for s in stages] == ["dense", "branch/code", "branch/en", "branch/ja",
                                           "init/btx", "train/btx", "routing/btx"]
    for domain in ("code", "en", "ja"):  # each branch trained on its own domain only
        run = out / "branch" / domain / "run"
        assert load_config(run / "config.yaml").data.blend == [f"demo:{domain}"]
        assert read_metrics(run / "metrics.jsonl")["train"][-1][0] == 2 * TOKENS_PER_STEP
    recipe = json.loads((out / "init" / "btx" / "upcycling.json").read_text())
    assert recipe["method"] == "btx" and len(recipe["btx_sources"]) == 3
    report = json.loads((out / "report.json").read_text())
    assert 0 < report["methods"]["btx"]["final"]["english/loss"] < 20
    assert "| btx |" in (out / "report.md").read_text()
