"""moe-recipe: the paper recipe's first step, from a dense base in a local Hugging Face cache.

A tiny dense Llama of configs/tiny-cpu.yaml's shape is laid out as huggingface_hub caches a
download (HF_HOME/hub/models--org--name/snapshots/<rev>/, refs/main) and named by repo id with
HF_HUB_OFFLINE=1: the tool finds it there, upcycles it into checkpoint.load, skips a finished
upcycle, refuses an output of another recipe, and reports every problem of a broken setup at
once. Real subprocesses (huggingface_hub reads HF_HOME when first imported): those against
the cached base forked from one driver that imported it with HF_HOME set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli, set_args
from tests.forkrun import run_clis

CLI = ["-m", "megatron_ext.cli.recipe", "--config", "configs/tiny-cpu.yaml"]
REPO_ID = "test-org/tiny-dense"
REVISION = "0123456789abcdef0123456789abcdef01234567"
# configs/tiny-cpu.yaml's model
SHAPE = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=256, vocab_size=4096, max_position_embeddings=256)


def write_tokenizer(path: Path, vocab_size: int) -> Path:
    """An HF tokenizer directory with ``vocab_size`` ids, ``</s>`` among them."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, **{f"t{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return path


def hub_cache(hf_home: Path, repo_id: str = REPO_ID, **shape) -> Path:
    """A dense Llama in huggingface_hub's cache layout under ``hf_home``; its snapshot dir."""
    from transformers import LlamaConfig, LlamaForCausalLM

    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    torch.manual_seed(0)
    config = LlamaConfig(**{**SHAPE, **shape}, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(snapshot)
    write_tokenizer(snapshot, config.vocab_size)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


def offline(hf_home: Path) -> dict[str, str]:
    return {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("hf_home")
    hub_cache(home)
    return home


def recipe_args(tmp_path: Path, *settings: str, check: bool = False) -> list[str]:
    return [*CLI, *set_args(f"upcycling.dense_base={REPO_ID}",
                            f"checkpoint.load={tmp_path / 'upcycled'}",
                            f"checkpoint.save={tmp_path / 'ckpt'}",
                            f"logging.output_dir={tmp_path / 'run'}", *settings),
            *(["--check"] if check else [])]


@pytest.fixture(scope="module")
def cached_runs(hf_home: Path, tmp_path_factory) -> tuple[Path, Path, list]:
    """The runs against the cached dense base, in order, forked from one driver started with
    HF_HOME set (tests/forkrun.py): upcycle, the same again, another recipe (one directory),
    then a broken setup checked (another). Returns the two directories and the results."""
    once, broken = tmp_path_factory.mktemp("once"), tmp_path_factory.mktemp("broken")
    tokenizer = write_tokenizer(broken / "tok", 5000)
    missing = [broken / "data" / "en_text_document", broken / "data" / "ja_text_document"]
    results = run_clis([
        recipe_args(once), recipe_args(once), recipe_args(once, "upcycling.seed=5"),
        recipe_args(broken, "data.demo_corpus=false", f"data.blend=[{missing[0]}, {missing[1]}]",
                    "data.valid_sets={}", f"data.tokenizer={tokenizer}", "model.num_layers=2",
                    check=True),
    ], tmp_path_factory.mktemp("forkrun"), timeout=300, env=offline(hf_home))
    return once, broken, results


def test_hub_id_is_upcycled_once_then_skipped(hf_home: Path, cached_runs) -> None:
    tmp_path, _, (r, again, other, _) = cached_runs
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    info = json.loads((tmp_path / "upcycled" / "upcycling.json").read_text())
    snapshot = hf_home / "hub" / "models--test-org--tiny-dense" / "snapshots" / REVISION
    assert info["input"] == str(snapshot) and info["dense_base"] == REPO_ID
    assert (info["method"], info["ratio"], info["num_experts"]) == ("drop", 0.5, 8)
    assert (tmp_path / "upcycled" / "latest").is_file()
    assert "max |logit diff|" in r.stdout or "logit" in r.stdout, r.stdout  # validated

    # a requeued job: the upcycle verifies, nothing is redone
    assert again.returncode == 0, again.stderr
    assert "skipping the upcycle" in again.stdout, again.stdout

    # another recipe: refused, kept
    assert other.returncode == 2, other.stdout + other.stderr
    assert "upcycled with another recipe: seed 1234 (config: 5)" in other.stderr, other.stderr
    assert json.loads((tmp_path / "upcycled" / "upcycling.json").read_text()) == info


def test_every_problem_is_named_at_once(cached_runs) -> None:
    _, tmp_path, (*_, r) = cached_runs
    tokenizer = tmp_path / "tok"
    missing = [tmp_path / "data" / "en_text_document", tmp_path / "data" / "ja_text_document"]
    assert r.returncode == 2, r.stdout + r.stderr
    assert "4 problems; nothing was started" in r.stderr, r.stderr
    for prefix in missing:
        assert f"data: missing {prefix}.bin and {prefix}.idx" in r.stderr
    assert f"{tokenizer} has 5000 tokens, more than the model's vocabulary " \
           "(model.vocab_size 4096)" in r.stderr
    assert "does not have the config's shape (config vs dense): model.num_layers 2 vs 4" \
        in r.stderr
    assert not (tmp_path / "upcycled").exists()


def test_uncached_hub_id_offline_is_one_problem(tmp_path: Path) -> None:
    # its own process: huggingface_hub reads HF_HOME as it is imported
    r = run_cli(recipe_args(tmp_path, check=True), timeout=300,
                env=offline(tmp_path / "empty_home"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "1 problem;" in r.stderr and f"upcycling.dense_base: {REPO_ID} is not in the " \
        "Hugging Face cache" in r.stderr, r.stderr
