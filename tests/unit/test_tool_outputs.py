"""Tools never destroy their input (issue 14, class 8).

1. Every tool with an output (upcycle, hf_to_mcore, mcore_to_hf, preprocess, train_tokenizer,
   routing, loss_curves) refuses an output that is, contains or lies inside one of its inputs,
   however it is spelled (``..``, ``./``, trailing ``/``, relative vs absolute, symlinks to the
   input or a parent, a symlinked parent of the output, hard links), ``--overwrite`` or not:
   exit 2, one stderr line, and not one byte, link or name anywhere in the tree changes.
2. A converter killed (SIGKILL, SIGTERM) while it validates a new output over a previous one
   leaves the input and the previous output exactly as they were, nothing under a hidden name.
3. The swap that replaces an output: with the atomic exchange a SIGKILL right after it leaves
   the new output complete; where the filesystem cannot exchange, a SIGKILL between the two
   renames is undone by the next run, which puts the previous output back.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_ext.conversion.hf_io import staged_dir
from megatron_ext.conversion.keymaps import ConversionError
from megatron_ext.errors import UsageError
from megatron_ext.platform.fs import _exchange, check_disjoint, replace_dir
from tests.conftest import REPO

TOOLS = ("upcycle", "hf_to_mcore", "mcore_to_hf", "preprocess", "train_tokenizer", "routing",
         "loss_curves")  # modules of megatron_ext.cli
DATA_CLI = {"preprocess", "train_tokenizer", "routing"}  # run through data.errors.run_cli
TEXT = "It was the best of times, it was the worst of times.\n\n吾輩は猫である。名前はまだ無い。\n"


def _tiny_llama(path: Path, seed: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, vocab_size=256)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


def _world(root: Path) -> Path:
    """Real inputs of every tool, plus the links the spellings need. The mcore roots are laid
    out as checkpoint.save writes them (``latest``, ``iter_*``, ``hf/``); the tools refuse
    before reading any weights, so their shards are not needed."""
    from megatron_ext.data.tokenizer_training import train_bpe_tokenizer

    _tiny_llama(root / "dense", 0)
    _tiny_llama(root / "other", 1)
    (root / "corpus").mkdir()
    for name in ("en.txt", "ja.txt"):
        (root / "corpus" / name).write_text(TEXT * 20)
    train_bpe_tokenizer([str(root / "corpus" / "en.txt")], 300, str(root / "tok"))
    for ckpt, latest in (("ckpt", "iter_0000002"), ("ckpt2", "../elsewhere/iter_0000004")):
        (root / ckpt / "iter_0000002").mkdir(parents=True)
        (root / ckpt / "iter_0000002" / "meta.json").write_text('{"step": 2}')
        (root / ckpt / "latest").write_text(latest + "\n")
    (root / "ckpt" / "hf").mkdir()
    (root / "ckpt" / "hf" / "config.json").write_text("{}")
    (root / "elsewhere" / "iter_0000004").mkdir(parents=True)
    (root / "run").mkdir()
    (root / "run" / "metrics.jsonl").write_text(
        json.dumps({"kind": "train", "step": 1, "tokens": 100, "loss": 5.0}) + "\n")
    (root / "data").mkdir()
    (root / "data" / "mix.bin").write_text(TEXT)  # a file an input symlink points at
    os.link(root / "corpus" / "en.txt", root / "data" / "hl.idx")  # a second name of en.txt
    for link, target in (("link", "dense"), ("plink", "."), ("inlink", "dense"),
                         ("alias.txt", "data/mix.bin")):
        (root / link).symlink_to(target)
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return _world(tmp_path_factory.mktemp("tools"))


def tree_hash(root: Path) -> str:
    """Every name, file content and link target under ``root`` (links are not followed)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath, name)
            h.update(str(p.relative_to(root)).encode())
            if p.is_symlink():
                h.update(b"->" + os.readlink(p).encode())
            elif p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


def _tool(name: str):
    assert name in TOOLS
    return importlib.import_module(f"megatron_ext.cli.{name}")


UP = ["--num-experts", "2", "--method", "naive", "--skip-validation", "--overwrite"]
# case: (tool, argv relative to the world root (the cwd), what the one line must name)
CASES = {
    "upcycle equal": ("upcycle", ["--input", "{w}/dense", "--output", "{w}/dense", *UP],
                      "(it is the input)"),
    "upcycle trailing slash": ("upcycle", ["--input", "dense", "--output", "dense/", *UP],
                               "(it is the input)"),
    "upcycle dir/.": ("upcycle", ["--input", "dense", "--output", "{w}/dense/.", *UP],
                      "(it is the input)"),
    "upcycle sub/..": ("upcycle", ["--input", "dense", "--output", "corpus/../dense", *UP],
                       "(it is the input)"),
    "upcycle relative vs absolute": ("upcycle", ["--input", "./dense", "--output", "{w}/dense",
                                                 *UP], "(it is the input)"),
    "upcycle symlink to input": ("upcycle", ["--input", "dense", "--output", "link", *UP],
                                 "(it is the input)"),
    "upcycle symlink to parent": ("upcycle", ["--input", "dense", "--output", "plink/dense",
                                              *UP], "(it is the input)"),
    "upcycle inside input": ("upcycle", ["--input", "dense", "--output", "dense/moe", *UP],
                             "(it lies inside the input)"),
    "upcycle symlinked parent": ("upcycle", ["--input", "dense", "--output", "inlink/moe", *UP],
                                 "(it lies inside the input)"),
    "upcycle contains input": ("upcycle", ["--input", "plink/dense", "--output", ".", *UP],
                               "(it contains the input)"),
    "upcycle btx source": ("upcycle", ["--input", "dense", "--output", "other/.",
                                       "--btx-sources", "other", "--method", "btx",
                                       "--num-experts", "2", "--overwrite"],
                           "input --btx-sources other (it is the input)"),
    "hf_to_mcore ./": ("hf_to_mcore", ["--input", "dense", "--output", "./dense/",
                                       "--overwrite"], "(it is the input)"),
    "mcore_to_hf latest elsewhere": ("mcore_to_hf", ["--input", "ckpt2", "--output",
                                                     "elsewhere/iter_0000004", "--overwrite"],
                                     "--input (its latest)"),
    "mcore_to_hf hf record": ("mcore_to_hf", ["--input", "ckpt/iter_0000002", "--output",
                                              "ckpt/hf", "--overwrite"],
                              "--input (its hf/ record)"),
    "mcore_to_hf inside root": ("mcore_to_hf", ["--input", "{w}/ckpt/", "--output",
                                                "ckpt/export"], "(it lies inside the input)"),
    "preprocess symlinked input": ("preprocess", ["--input", "alias.txt", "--output-prefix",
                                                  "data/mix", "--tokenizer", "tok"],
                                   "input --input alias.txt (it is the input)"),
    "preprocess hard link": ("preprocess", ["--input", "corpus/en.txt", "--output-prefix",
                                            "data/hl", "--tokenizer", "tok"],
                             "(it is the input under another name"),
    "preprocess into tokenizer": ("preprocess", ["--input", "corpus/en.txt", "--output-prefix",
                                                 "data/../tok/mix", "--tokenizer", "tok/"],
                                  "--tokenizer tok/ (it lies inside the input)"),
    "train_tokenizer dir of input": ("train_tokenizer", ["--input", "corpus/en.txt",
                                                         "--vocab-size", "300", "--output",
                                                         "corpus/", "--overwrite"],
                                     "(it contains the input)"),
    "train_tokenizer via symlink": ("train_tokenizer", ["--input", "{w}/corpus/ja.txt",
                                                        "--vocab-size", "300", "--output",
                                                        "plink/corpus/ja.txt"],
                                    "(it is the input)"),
    "routing over texts": ("routing", ["--checkpoint", "ckpt", "--text", "en=corpus/en.txt",
                                       "--output", "corpus"], "input --text corpus/en.txt"),
    "routing inside checkpoint": ("routing", ["--checkpoint", "ckpt", "--text",
                                              "en=corpus/en.txt", "--output", "ckpt/routing"],
                                  "input --checkpoint ckpt (it lies inside the input)"),
    "loss_curves into run": ("loss_curves", ["--run", "a=run", "--output", "run/."],
                             "input --run run (it is the input)"),
    "loss_curves around run": ("loss_curves", ["--run", "a={w}/run", "--output", "plink"],
                               "(it contains the input)"),
}


@pytest.fixture
def keep_sigterm():
    handler = signal.getsignal(signal.SIGTERM)  # run_tool installs its own
    yield
    signal.signal(signal.SIGTERM, handler)


@pytest.mark.parametrize("case", list(CASES))
def test_output_overlapping_an_input_is_refused(world, case, capsys, monkeypatch,
                                                keep_sigterm) -> None:
    tool, argv, reason = CASES[case]
    monkeypatch.chdir(world)
    before = tree_hash(world)
    module = _tool(tool)
    argv = [a.format(w=world) for a in argv]
    rc = module.run_cli(module.main, argv) if tool in DATA_CLI else module.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, (rc, err)
    assert "would overwrite input" in err[0] and reason in err[0], err[0]
    assert tree_hash(world) == before  # nothing written, moved, removed or relinked


@pytest.mark.parametrize("output", ["dense2", "DENSE", "corpus/../dense2/x", "dense.bin"])
def test_neighbours_are_not_inputs(world, output, monkeypatch) -> None:
    # Only a real overlap is refused: a shared name prefix is a sibling, and Linux names are
    # case-sensitive (another case is another directory).
    monkeypatch.chdir(world)
    check_disjoint(output, [("--input", "dense"), ("--input", "corpus/en.txt")])
    with pytest.raises(UsageError, match=r"^--output dense/x would overwrite input --input "):
        check_disjoint("dense/x", [("--input", "corpus/en.txt"), ("--input", "./dense")])


# --- killed mid-overwrite ---------------------------------------------------------------------
def _start_upcycle(world: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "megatron_ext.cli.upcycle", "--input", str(world / "dense"),
         "--output", str(out), "--num-experts", "2", "--method", "naive", "--overwrite"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def _wait_until_validating(proc: subprocess.Popen, out: Path, timeout: float = 240) -> None:
    """The staged output is complete (upcycling.json is its last file) and transformers is
    loading both models: the old output and the new one both exist now."""
    deadline = time.monotonic() + timeout
    while not list(out.parent.glob(f".{out.name}.tmp-*/upcycling.json")):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "upcycle never reached validation"
        time.sleep(0.02)
    time.sleep(0.3)


@pytest.mark.slow
def test_converter_killed_while_validating_keeps_input_and_previous_output(world, tmp_path):
    from megatron_ext.upcycling.convert import upcycle_checkpoint
    from megatron_ext.upcycling.spec import UpcycleSpec

    input_hash = tree_hash(world / "dense")
    runs = {}
    for sig in (signal.SIGKILL, signal.SIGTERM):  # both at once: the machine has two cores
        out = tmp_path / f"moe_{sig.name}"
        upcycle_checkpoint(world / "dense", out, UpcycleSpec(method="naive", num_experts=4),
                           validate=False, log=lambda _: None)  # the previous output
        runs[sig] = (out, tree_hash(out), _start_upcycle(world, out))
    for sig, (out, previous, proc) in runs.items():
        _wait_until_validating(proc, out)
        proc.send_signal(sig)
        assert proc.wait(timeout=120) == (-9 if sig == signal.SIGKILL else 143), proc.stderr.read()
        proc.stderr.close()
        assert tree_hash(out) == previous, sig
        assert json.loads((out / "config.json").read_text())["num_local_experts"] == 4
        hidden = sorted(p.name for p in tmp_path.glob(f".{out.name}*"))
        # SIGKILL cannot clean up: only the hidden staging dir of the new output may remain.
        assert hidden == ([] if sig == signal.SIGTERM else [f".{out.name}.tmp-{proc.pid}"])
    assert tree_hash(world / "dense") == input_hash


_CHILD = r"""
import os, signal, sys
from pathlib import Path
from megatron_ext.platform import fs as cli_utils

mode, new, target = sys.argv[1:]
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "fallback":  # as on a filesystem without RENAME_EXCHANGE: two renames
    cli_utils._LIBC = None
    rename = os.rename
    def rename_then_die(a, b):
        rename(a, b)
        die()
    cli_utils.os.rename = rename_then_die
else:
    exchange = cli_utils._exchange
    def exchange_then_die(a, b):
        exchange(a, b)
        die()
    cli_utils._exchange = exchange_then_die
cli_utils.replace_dir(Path(new), Path(target))
"""


def _killed_replace(mode: str, tmp_path: Path) -> Path:
    out, new = tmp_path / "out", tmp_path / ".out.tmp-1"
    for d, text in ((out, "previous"), (new, "new")):
        d.mkdir()
        (d / "weights").write_text(text)
    r = subprocess.run([sys.executable, "-c", _CHILD, mode, str(new), str(out)],
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert r.returncode == -9
    return out


def test_sigkill_between_fallback_renames_is_undone_by_the_next_run(tmp_path) -> None:
    out = _killed_replace("fallback", tmp_path)
    # The window the fallback cannot close: the previous output is aside, under a hidden name.
    assert not out.exists() and [p.name for p in tmp_path.glob(".out.old-*")]
    with pytest.raises(ConversionError, match="exists"):  # put back, then refused as usual
        with staged_dir(out, overwrite=False):
            pass
    assert (out / "weights").read_text() == "previous"
    assert not list(tmp_path.glob(".out.old-*"))


def test_sigkill_right_after_the_atomic_swap_leaves_the_new_output(tmp_path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    if not _exchange(a, b):
        pytest.skip("this filesystem has no RENAME_EXCHANGE (the fallback is tested above)")
    out = _killed_replace("exchange", tmp_path / "a")
    assert (out / "weights").read_text() == "new"  # complete; the old one is only garbage


def test_replace_dir_replaces_links_and_files_not_what_they_point_to(tmp_path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("keep")
    for kind in ("link", "file"):
        target, new = tmp_path / kind, tmp_path / f".{kind}.tmp"
        if kind == "link":
            target.symlink_to(elsewhere)
        else:
            target.write_text("old")
        new.mkdir()
        (new / "x").write_text(kind)
        replace_dir(new, target)
        assert target.is_dir() and not target.is_symlink() and (target / "x").read_text() == kind
    assert [p.name for p in elsewhere.iterdir()] == ["keep"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "file", "link"]
