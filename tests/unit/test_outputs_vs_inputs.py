"""Every tool that writes checks its outputs against all of its inputs, and no run file is
written through a symbolic link (issue 24, class 3).

One world of real inputs (a config file, a tokenizer, dataset prefixes, a validation set, a
converted checkpoint that verifies, a checkpoint root whose ``latest`` points elsewhere, a dense
HF model, a run's metrics). Each case runs the real CLI as a subprocess with one output placed
on, inside or around one input (however spelled) or one run file replaced by a link to a file
outside, and asserts: exit 2, one stderr line naming the output and the input (or the link),
and every byte, name and link of the world exactly as before (``tree_hash``). The mechanism is
one function, ``platform.fs.check_io``; ``platform.run_files`` declares what a training run
reads and writes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from megatron_ext.platform.run_files import OUTPUT_DIR_FILES, SAVE_DIR_FILES
from tests.conftest import REPO, run_cli, set_args
from tests.unit.test_tool_outputs import tree_hash

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}  # lm_eval's local tasks only
TEXT = "It was the best of times, it was the worst of times.\n\n吾輩は猫である。\n" * 30
SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=512)


def build_world(root: Path) -> Path:
    """Real inputs: ``cfg.yaml``; ``data/`` with a tokenizer (``data/tok``) and the prefix
    ``data/mix``; ``valid/va``; ``moe/`` (hf_to_mcore of a tiny Mixtral: a checkpoint that
    verifies); ``ptr/`` whose ``latest`` names ``../elsewhere/iter_0000004``; ``dense/`` (HF
    Llama); ``runs/a/metrics.jsonl``; ``victim.txt``, what planted links point at."""
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    from megatron_ext.data.tokenizer_training import train_bpe_tokenizer

    (root / "data").mkdir()
    (root / "en.txt").write_text(TEXT, encoding="utf-8")
    train_bpe_tokenizer([str(root / "en.txt")], 300, str(root / "data" / "tok"))
    for prefix in ("data/mix", "valid/va"):
        (root / prefix).parent.mkdir(exist_ok=True)
        for ext in (".bin", ".idx"):  # the checks come before any read: names suffice
            (root / f"{prefix}{ext}").write_bytes(b"dataset bytes " + ext.encode())
    shutil.copy(REPO / "configs" / "tiny-cpu.yaml", root / "cfg.yaml")
    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(**SHAPE, num_local_experts=4, num_experts_per_tok=2)
                       ).save_pretrained(root / "mixtral")
    LlamaForCausalLM(LlamaConfig(**SHAPE)).save_pretrained(root / "dense")
    proc = run_cli(["-m", "megatron_ext.cli.hf_to_mcore", "--input", str(root / "mixtral"),
                    "--output", str(root / "moe"), "--skip-validation"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (root / "ptr").mkdir()
    (root / "ptr" / "latest").write_text("../elsewhere/iter_0000004\n")
    (root / "elsewhere" / "iter_0000004").mkdir(parents=True)
    (root / "runs" / "a").mkdir(parents=True)
    (root / "runs" / "a" / "metrics.jsonl").write_text(
        json.dumps({"kind": "train", "step": 1, "tokens": 100, "loss": 5.0}) + "\n")
    (root / "victim.txt").write_text("not a run file: must never be written\n")
    (root / "link_to_moe").symlink_to("moe")
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return build_world(tmp_path_factory.mktemp("io"))


def train_args(w: Path, *sets: str) -> list[str]:
    """A training run whose every input exists: refused or not by the output checks alone."""
    return ["pretrain_moe.py", "--config", str(w / "cfg.yaml"), *set_args(
        "data.demo_corpus=false", "data.mock=false", f"data.tokenizer={w}/data/tok",
        f"data.blend=[{w}/data/mix]", f"data.valid_sets={{va: {w}/valid/va}}",
        f"checkpoint.load={w}/moe", f"checkpoint.save={w}/out/save",
        f"logging.output_dir={w}/out/run", *sets)]


def _refused(w: Path, argv: list[str], *expected: str, prefix: str = "") -> str:
    before = tree_hash(w)
    proc = run_cli(argv, timeout=300, env=OFFLINE)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    assert lines[0].startswith(prefix), lines[0]
    for text in expected:
        assert text.format(w=w) in lines[0], lines[0]
    assert tree_hash(w) == before  # no input, no byte, no name touched
    return lines[0]


# --- training: logging.output_dir, checkpoint.save, data.cache_dir vs every input --------------
TRAINING = {  # case: (--set overrides, what the one line says)
    "output_dir is checkpoint.load": (
        ["logging.output_dir={w}/moe"],
        "logging.output_dir {w}/moe would overwrite input checkpoint.load {w}/moe (it is the "
        "input)"),
    "output_dir is checkpoint.load, spelled moe/../moe/": (
        ["logging.output_dir={w}/moe/../moe/"], "checkpoint.load {w}/moe (it is the input)"),
    "output_dir is a link to checkpoint.load": (
        ["logging.output_dir={w}/link_to_moe"], "checkpoint.load {w}/moe (it is the input)"),
    "output_dir inside checkpoint.load's iter dir": (
        ["logging.output_dir={w}/moe/iter_0000000"],
        "input checkpoint.load {w}/moe (it lies inside the input)"),
    "output_dir is what checkpoint.load's latest names": (
        ["checkpoint.load={w}/ptr", "logging.output_dir={w}/elsewhere/iter_0000004"],
        "input checkpoint.load (its latest) {w}/ptr/../elsewhere/iter_0000004"),
    "checkpoint.save is checkpoint.load": (
        ["checkpoint.save={w}/moe"], "checkpoint.save {w}/moe would overwrite input "
        "checkpoint.load {w}/moe (it is the input)"),
    "checkpoint.save around checkpoint.load (pruning)": (
        ["checkpoint.load={w}/moe/iter_0000000", "checkpoint.save={w}/moe"],
        "checkpoint.load {w}/moe/iter_0000000 (it contains the input)"),
    "output_dir is the tokenizer": (
        ["logging.output_dir={w}/data/tok"], "input data.tokenizer {w}/data/tok (it is"),
    "output_dir holds tokenizer and data": (
        ["logging.output_dir={w}/data"], "input data.tokenizer {w}/data/tok (it contains"),
    "checkpoint.save holds a validation set": (
        ["checkpoint.save={w}/valid"], "input data.valid_sets.va {w}/valid/va.bin (it contains"),
    "output_dir holds the config file": (
        ["logging.output_dir={w}"], "input --config {w}/cfg.yaml (it contains the input)"),
    "data.cache_dir inside checkpoint.load": (
        ["data.cache_dir={w}/moe/cache"],
        "data.cache_dir {w}/moe/cache would overwrite input checkpoint.load {w}/moe"),
}


@pytest.mark.parametrize("case", list(TRAINING))
def test_training_outputs_vs_inputs(world, case):
    sets, expected = TRAINING[case]
    _refused(world, train_args(world, *(s.format(w=world) for s in sets)), expected,
             prefix="config error: ")


RUN_FILES = [("run", name) for name in OUTPUT_DIR_FILES] + [
    ("save", name) for name in SAVE_DIR_FILES]


@pytest.mark.parametrize("where, name", RUN_FILES)
def test_training_never_writes_through_a_link(world, where, name, tmp_path):
    """A link planted where a run file goes (config.yaml, metrics.jsonl, the TensorBoard and
    W&B files, the lock, latest) is refused before anything is written; its target stays."""
    run, save = tmp_path / "run", tmp_path / "save"
    (tmp_path / where).mkdir()
    (tmp_path / where / name).symlink_to(world / "victim.txt")
    field = {"run": "logging.output_dir", "save": "checkpoint.save"}[where]
    _refused(world, train_args(world, f"logging.output_dir={run}", f"checkpoint.save={save}"),
             f"{field} {tmp_path / where}: {name} is a symbolic link (to {world}/victim.txt)",
             prefix="config error: ")
    assert sorted(p.name for p in (tmp_path / where).iterdir()) == [name]


def test_training_refuses_a_fifo_where_its_metrics_go(world, tmp_path):
    """A FIFO would block the run's first metrics write forever (or feed a reader elsewhere)."""
    (tmp_path / "run").mkdir()
    os.mkfifo(tmp_path / "run" / "metrics.jsonl")
    _refused(world, train_args(world, f"logging.output_dir={tmp_path}/run",
                               f"checkpoint.save={tmp_path}/save"),
             f"logging.output_dir {tmp_path}/run: metrics.jsonl is a FIFO, socket or device",
             prefix="config error: ")


# --- compare_inits: --output (which --overwrite deletes) vs the config's every input -----------
def compare_args(w: Path, output: str, *extra: str) -> list[str]:
    return ["-m", "megatron_ext.cli.compare_inits", "--config", str(w / "cfg.yaml"), *set_args(
        "data.demo_corpus=false", "data.mock=false", f"data.tokenizer={w}/data/tok",
        f"data.blend=[{w}/data/mix]"), "--methods", "naive", "--tokens", "10000000",
        "--output", output.format(w=w), "--overwrite", *extra]


COMPARE = {
    "output holds the tokenizer and datasets": (
        ["{w}/data", "--train-dense", "10000000"],
        "--output {w}/data would overwrite input data.tokenizer {w}/data/tok (it contains"),
    "output is a checkpoint.load given with --set": (
        ["{w}/moe", "--train-dense", "10000000", "--set", "checkpoint.load={w}/moe"],
        "input checkpoint.load {w}/moe (it is the input)"),
    "output inside --dense": (
        ["{w}/dense/cmp", "--dense", "{w}/dense"], "input --dense {w}/dense (it lies inside"),
    "output holds the config file": (
        ["{w}", "--train-dense", "10000000"], "input --config {w}/cfg.yaml (it contains"),
}


@pytest.mark.parametrize("case", list(COMPARE))
def test_compare_output_vs_inputs(world, case):
    (output, *extra), expected = COMPARE[case]
    _refused(world, compare_args(world, output, *(e.format(w=world) for e in extra)), expected,
             prefix="error: ")


@pytest.mark.parametrize("name", ["logs", "heldout"])
def test_compare_never_writes_through_a_link(world, name, tmp_path):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / name).symlink_to(world / "data", target_is_directory=True)
    _refused(world, compare_args(world, str(out), "--train-dense", "10000000"),
             f"--output {out}: {name} is a symbolic link (to {world}/data)", prefix="error: ")


# --- the other tools ----------------------------------------------------------------------------
def test_lm_eval_output_inside_the_checkpoint_is_refused(world):
    """Results written into a checkpoint would make it fail verification for good."""
    _refused(world, ["-m", "megatron_ext.cli.lm_eval", "--checkpoint", str(world / "moe"),
                     "--tasks", "demo_en_mc", "--limit", "1", "--tokenizer",
                     str(world / "data" / "tok"), "--output",
                     str(world / "moe" / "iter_0000000" / "lm_eval")],
             "--output {w}/moe/iter_0000000/lm_eval would overwrite input --checkpoint {w}/moe "
             "(it lies inside the input)", prefix="error: ")


@pytest.mark.parametrize("case", ["tokenizer", "local tasks", "results link"])
def test_lm_eval_output_checks(world, case, tmp_path):
    """The rest of lm_eval's table, on the function its CLI calls after loading the model (its
    inputs known): the tokenizer given, the shipped local tasks, a results file that is a
    link."""
    from megatron_ext.data.errors import DataError
    from megatron_ext.evaluation import harness

    out = {"tokenizer": world / "data", "local tasks": REPO, "results link": tmp_path}[case]
    if case == "results link":
        (tmp_path / "results.json").symlink_to(world / "victim.txt")
    expected = {"tokenizer": "input --tokenizer", "local tasks": "input the local tasks",
                "results link": "results.json is a symbolic link"}[case]
    with pytest.raises(DataError, match=expected):
        harness.check_output(out, world / "moe", str(world / "data" / "tok"), lm=None)


def test_upcycle_output_around_its_config_is_refused(world, tmp_path):
    (tmp_path / "up").mkdir()
    shutil.copy(world / "cfg.yaml", tmp_path / "up" / "cfg.yaml")
    before = (tmp_path / "up" / "cfg.yaml").read_bytes()
    _refused(world, ["-m", "megatron_ext.cli.upcycle", "--input", str(world / "dense"), "--output",
                     str(tmp_path / "up"), "--overwrite", "--config",
                     str(tmp_path / "up" / "cfg.yaml")],
             f"--output {tmp_path}/up would overwrite input --config {tmp_path}/up/cfg.yaml "
             "(it contains the input)", prefix="error: ")
    assert (tmp_path / "up" / "cfg.yaml").read_bytes() == before


def test_routing_output_is_its_tokenizer(world):
    _refused(world, ["-m", "megatron_ext.cli.routing", "--checkpoint", str(world / "moe"), "--text",
                     f"en={world}/en.txt", "--tokenizer", str(world / "data" / "tok"),
                     "--output", str(world / "data" / "tok")],
             "--output {w}/data/tok would overwrite input --tokenizer {w}/data/tok",
             prefix="error: ")


@pytest.mark.parametrize("name", ["loss_curves.png", "loss_curves.md"])
def test_loss_curves_never_write_through_a_link(world, name, tmp_path):
    (tmp_path / name).symlink_to(world / "victim.txt")
    _refused(world, ["-m", "megatron_ext.cli.loss_curves", "--run", f"a={world}/runs/a",
                     "--output", str(tmp_path)],
             f"--output {tmp_path}: {name} is a symbolic link", prefix="error: ")


# --- the write functions themselves, against a link planted after the checks -------------------
def test_run_file_writers_do_not_follow_links(tmp_path):
    """The race the checks cannot close (a link appears between check and write):
    ``open_append`` (metrics.jsonl, stage logs) refuses it, ``atomic_write`` (config.yaml,
    results, ``latest``, the W&B id) replaces the link, and ``write_temp`` (the lock's record)
    never writes into a link planted at its temporary name."""
    import errno
    import socket

    from megatron_ext.platform.fs import atomic_write, open_append, write_temp

    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(OSError) as e:
        open_append(tmp_path / "metrics.jsonl")
    assert e.value.errno == errno.ELOOP
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OSError, match="No such device|not a regular file"):  # no wait
        open_append(tmp_path / "fifo")
    (tmp_path / "config.yaml").symlink_to(victim)
    atomic_write(tmp_path / "config.yaml", "a: 1\n")
    assert not (tmp_path / "config.yaml").is_symlink()
    planted = tmp_path / f"..lock.{socket.gethostname()}.{os.getpid()}.tmp"
    planted.symlink_to(victim)
    tmp = write_temp(tmp_path / ".lock", "record\n")
    assert tmp == planted and tmp.read_text() == "record\n" and not tmp.is_symlink()
    assert victim.read_text() == "keep\n"
