"""moe-mcore-to-hf's output is a model anyone can load (issue 25.2).

Guarantees shown, on a checkpoint the real pretrain_moe.py trained on the demo corpus (2 steps)
and the real mcore_to_hf.py exported with no tokenizer flag:
* the export holds the run's tokenizer (tokenizer.json, tokenizer_config.json,
  special_tokens_map.json), generation_config.json and the special token ids in config.json;
* transformers' AutoTokenizer encodes like the run's tokenizer, AutoModelForCausalLM loads the
  weights, and pipeline('text-generation') generates;
* (moe-lm-eval on such an export with no --tokenizer: tests/unit/test_lm_eval.py's parity
  test, whose export is no longer given tokenizer files by hand);
* a SentencePiece .model is exported as files AutoTokenizer loads, with its special token ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli
from tests.resilience import SMALL

DEMO = ["--set", "data.mock=false", "--set", "data.demo_corpus=true",
        "--set", "model.vocab_size=4096", "--set", "model.max_position_embeddings=64",
        "--set", "data.valid_sets={}"]


def _ok(proc) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("export")
    out = _ok(run_cli(["pretrain_moe.py", *SMALL, *DEMO, "--set", "train.train_steps=2",
                       "--set", "schedule.warmup_steps=1",
                       "--set", f"checkpoint.save={tmp}/ckpt",
                       "--set", f"logging.output_dir={tmp}/run"]))
    assert "MOCK DATA" not in out  # a run on text is not marked
    out = _ok(run_cli(["-m", "megatron_ext.cli.mcore_to_hf", "--input", str(tmp / "ckpt"),
                       "--output", str(tmp / "hf"), "--skip-validation"]))
    assert "tokenizer: " in out and "WARNING" not in out
    return tmp / "hf"


def test_export_carries_tokenizer_generation_config_and_token_ids(export: Path) -> None:
    from megatron_ext.data.demo import ensure_demo_data
    from megatron_ext.data.tokenizer import load_tokenizer

    names = {p.name for p in export.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json"} <= names
    ours = load_tokenizer(ensure_demo_data(cache_dir=str(REPO / ".cache" / "demo"))[0])
    config = json.loads((export / "config.json").read_text())
    generation = json.loads((export / "generation_config.json").read_text())
    for ids in (config, generation):
        assert ids["eos_token_id"] == ours.eod and ids["pad_token_id"] == ours.pad_id
        assert ids["bos_token_id"] is not None
    assert (export / "tokenizer.json").read_bytes() == (Path(ours.path) / "tokenizer.json"
                                                         ).read_bytes()


def test_auto_classes_load_it_and_pipeline_generates(export: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from megatron_ext.data.tokenizer import load_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(export)
    text = "To be, or not to be: that is the question.\n吾輩は猫である。"
    assert tokenizer.encode(text, add_special_tokens=False) == load_tokenizer(
        str(export)).encode(text)
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    assert type(model).__name__ == "MixtralForCausalLM"
    generate = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    out = generate("To be, or not", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert out.startswith("To be, or not") and len(out) > len("To be, or not")


def test_sentencepiece_model_is_exported_as_files_auto_tokenizer_loads(tmp_path) -> None:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from megatron_ext.conversion.hf_tokenizer import write_tokenizer
    from megatron_ext.data.demo import corpus_files
    from megatron_ext.data.tokenizer import load_tokenizer

    text = tmp_path / "en.txt"
    text.write_text(Path(corpus_files()[1]).read_text()[:100_000])
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=300, model_type="bpe", minloglevel=2)
    ours = load_tokenizer(str(tmp_path / "sp.model"))
    out = tmp_path / "export"
    out.mkdir()
    warnings: list[str] = []
    ids = write_tokenizer(ours, out, 128, log=warnings.append)
    assert ids == {"bos_token_id": 1, "eos_token_id": ours.eod, "pad_token_id": None}
    assert sorted(p.name for p in out.iterdir()) == [
        "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]
    hf = AutoTokenizer.from_pretrained(out)
    assert hf.encode("To be or not to be", add_special_tokens=False) == ours.encode(
        "To be or not to be")
    # sentencepiece's default normalizer folds whitespace runs, transformers' conversion not
    assert all("SentencePiece" in w for w in warnings)
