"""Text generation (megatron_ext.evaluation.generate, moe-generate): what it guarantees.

* Greedy generation of our megatron model (KV cache) equals transformers' ``generate``
  (do_sample=False) on the HF export of the same checkpoint, token for token, for 32 new tokens
  on 8 prompts of different lengths (fp32 CPU): ours one prompt at a time, 3 and 8 at a time
  (left-padded), against transformers one at a time and 8 at a time.
* A row stops at EOS (not included), when ``stop`` says so, or at the context length, and
  each stopped row is a prefix of the unstopped greedy row.
* Sampling is reproducible with a seed, differs across seeds, keeps only the top-p nucleus;
  meaningless temperature/top-p values are refused.
* The CLI prints one completion per prompt (its --json ids are the library's), and bad input
  (missing checkpoint, empty prompts, a prompt longer than the context, bad sampling values)
  ends in one stderr line and exit 2.

The module fixture trains a tiny MoE with the real pretrain_moe.py on the demo corpus, exports
it with moe-mcore-to-hf and runs one probe process over both models and the CLI's main; these,
the bench and one bad-input CLI run are forked from one driver (tests.forkrun).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from megatron_ext.cli.generate import main as generate_main
from megatron_ext.cli.generate import show
from megatron_ext.data.errors import DataError
from megatron_ext.evaluation.generate import check_prompts, check_sampling, next_tokens
from tests.conftest import REPO, set_args
from tests.forkrun import run_clis

NEW = 32
TRAIN = ["pretrain_moe.py", "--config", "configs/tiny-cpu.yaml", *set_args(
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "moe.num_experts=4", "data.seq_length=64", "train.global_batch_size=8",
    "train.micro_batch_size=4", "train.eval_interval=0", "data.valid_sets={}",
    "train.log_interval=10", "schedule.warmup_steps=2", "train.train_steps=30",
    "optimizer.lr=3e-3")]
PROMPTS = [
    "To",
    "To be, or not to be, that is the question:",
    "吾輩は猫である。名前はまだ無い。",
    "KING HENRY. Once more unto the breach, dear friends, once more; Or close the wall up "
    "with our English dead. In peace there's nothing so becomes a man",
    "ROMEO.\n",
    "HAMLET. Alas, poor Yorick! I knew him, Horatio: a fellow of infinite jest,",
    "def main(argv):\n    import sys\n    ",
    "親譲りの無鉄砲で小供の時から損ばかりしている。",
]

PROBE = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    from megatron_ext.checkpoint.load_model import checkpoint_config, load_model
    from megatron_ext.evaluation.generate import generate
    from megatron_ext.data.run_tokenizer import checkpoint_tokenizer
    from megatron_ext.platform.dist import shutdown

    if __name__ == "__main__":
        ckpt, hf_dir, texts, new = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), 32
        verified = checkpoint_config(ckpt)
        tok = checkpoint_tokenizer(verified.config)
        prompts = tok.encode_batch(texts)
        cfg, model = load_model(verified)
        gen = lambda **kw: generate(model, prompts, kw.pop("n", new), eos_id=kw.pop("eos", tok.eod),
                                    vocab_size=cfg.model.vocab_size, **kw)
        out = {"prompts": prompts, "eod": tok.eod, "batched": gen(batch_size=3),
               "unbatched": gen(batch_size=1), "batch8": gen(batch_size=8), "zero": gen(n=0)}
        out["eos_at"] = out["batched"][1][5]  # a token that row 1 emits: its 6th
        out["eos_cut"] = gen(eos=out["eos_at"], batch_size=4)
        out["stop3"] = gen(stop=lambda ids: len(ids) >= 3, batch_size=2)
        room = len(prompts[1]) + 4
        short = [i for i, p in enumerate(prompts) if len(p) < room]
        ctx = generate(model, [prompts[i] for i in short], new, eos_id=tok.eod, max_length=room,
                       vocab_size=cfg.model.vocab_size, batch_size=5)
        out["ctx"] = dict(zip(short, ctx))
        sample = lambda seed, **kw: gen(temperature=1.0, top_p=0.9, seed=seed, **kw)
        out["s1"], out["s1_again"], out["s2"] = sample(1), sample(1), sample(2)
        out["nucleus_of_one"] = gen(temperature=1.0, top_p=1e-6, seed=3)
        shutdown()
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        hf_gen = lambda x, mask: hf.generate(  # noqa: E731
            x, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=new,
            eos_token_id=tok.eod, pad_token_id=tok.eod)
        out["hf"] = []
        for ids in prompts:
            x = torch.tensor([ids])
            out["hf"].append(hf_gen(x, torch.ones_like(x))[0, len(ids):].tolist())
        width = max(len(p) for p in prompts)  # all at once, left-padded as transformers wants
        x = torch.tensor([[tok.eod] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out["hf_batch8"] = [row[width:] for row in hf_gen(x, mask).tolist()]
        # The CLI's main in this process too (one model load less than a process of its own);
        # test_cli_bad_inputs_exit_2_with_one_line runs the CLI as a real process.
        import contextlib, io
        from megatron_ext.cli.generate import main
        cli_out = io.StringIO()
        with contextlib.redirect_stdout(cli_out):
            code = main(["--checkpoint", ckpt, "--prompts", sys.argv[4], "--max-new-tokens",
                         str(new), "--json"])
        out["cli"] = {"code": code, "stdout": cli_out.getvalue()}
        print("PROBE " + json.dumps(out))
""")


def _ok(proc) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def forked(tmp_path_factory) -> dict:
    """The processes of this module's slow tests, forked in order from one driver
    (tests.forkrun; one import of torch and megatron, not five): training, the export, the
    probe, the throughput bench, and the CLI on a file with no prompts (a real process: the
    exit status and stderr exactly as a user sees them)."""
    tmp = tmp_path_factory.mktemp("generate")
    script, prompts, empty = tmp / "probe.py", tmp / "prompts.txt", tmp / "empty.txt"
    script.write_text(PROBE)
    # for the CLI; blank lines are not prompts
    prompts.write_text("\n".join([PROMPTS[0], "", *PROMPTS[1:3], "  "]) + "\n", encoding="utf-8")
    empty.write_text("\n  \n", encoding="utf-8")
    calls = {
        "train": [*TRAIN, "--set", f"checkpoint.save={tmp}/ckpt",
                  "--set", f"logging.output_dir={tmp}/run"],
        "export": ["-m", "megatron_ext.cli.mcore_to_hf", "--input", str(tmp / "ckpt"),
                   "--output", str(tmp / "hf"), "--dtype", "float32", "--skip-validation"],
        "probe": [str(script), str(tmp / "ckpt"), str(tmp / "hf"), json.dumps(PROMPTS),
                  str(prompts)],
        "bench": ["tools/bench/generate_throughput.py", "--checkpoint", str(tmp / "ckpt"),
                  "--hf", str(tmp / "hf"), "--new-tokens", "4", "--prompts", "3",
                  "--batch-sizes", "1,3", "--repeats", "1", "--clock", "cpu"],
        "no prompts": ["-m", "megatron_ext.cli.generate", "--checkpoint", str(tmp / "ckpt"),
                       "--prompts", str(empty)],
    }
    return {"tmp": tmp, "empty": empty,
            **dict(zip(calls, run_clis(list(calls.values()), tmp / "driver")))}


@pytest.fixture(scope="module")
def ckpt(forked: dict) -> Path:
    _ok(forked["train"])
    _ok(forked["export"])
    return forked["tmp"]


@pytest.fixture(scope="module")
def probe(ckpt: Path, forked: dict) -> dict:
    out = _ok(forked["probe"])
    line = next(line for line in out.splitlines() if line.startswith("PROBE "))
    return json.loads(line[len("PROBE "):])


def _until_eos(ids: list[int], eod: int) -> list[int]:
    return ids[:ids.index(eod)] if eod in ids else ids


@pytest.mark.slow
def test_greedy_equals_transformers_batched_and_unbatched(probe: dict) -> None:
    lengths = sorted(len(p) for p in probe["prompts"])
    assert len(lengths) == 8 and len(set(lengths)) == 8 and lengths[0] == 1  # padding happens
    for i, hf in enumerate(probe["hf"]):
        want = _until_eos(hf, probe["eod"])  # transformers keeps the EOS it stopped at
        assert probe["batched"][i] == want, i
        assert probe["unbatched"][i] == want, i
        assert probe["batch8"][i] == want, i
        # transformers' own batch of 8 (left-padded; it pads finished rows with EOS)
        assert _until_eos(probe["hf_batch8"][i], probe["eod"]) == want, i
        assert len(want) == NEW or len(hf) > len(want)  # full length, or ended at EOS
    assert probe["zero"] == [[] for _ in PROMPTS]


@pytest.mark.slow
def test_rows_stop_at_eos_stop_function_and_context(probe: dict) -> None:
    greedy, eos = probe["batched"], probe["eos_at"]
    for i, row in enumerate(greedy):
        assert probe["eos_cut"][i] == _until_eos(row, eos)
        assert probe["stop3"][i] == row[:3]
    assert probe["eos_cut"][1] == greedy[1][:greedy[1].index(eos)]  # really cut
    # A context of len(prompt 1) + 4 tokens: prompt 1 gets 4 new tokens, the shorter
    # prompts the room they have (longer ones are refused: test_prompts_are_checked).
    room = len(probe["prompts"][1]) + 4
    assert "1" in probe["ctx"] and len(probe["ctx"]) >= 2
    for i, row in probe["ctx"].items():
        assert row == greedy[int(i)][:room - len(probe["prompts"][int(i)])]


@pytest.mark.slow
def test_sampling_is_seeded(probe: dict) -> None:
    assert probe["s1"] == probe["s1_again"]
    assert probe["s1"] != probe["s2"]
    assert probe["s1"] != probe["batched"]
    assert probe["nucleus_of_one"] == probe["batched"]  # top-p keeps the most likely token


def test_next_tokens_keeps_the_nucleus() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4).contiguous()
    gen = torch.Generator().manual_seed(0)
    for top_p, kept in ((0.5, {0}), (0.7, {0, 1}), (0.8, {0, 1}), (0.81, {0, 1, 2}),
                        (1.0, {0, 1, 2, 3})):
        assert set(next_tokens(logits, 1.0, top_p, gen).tolist()) == kept, top_p
    # Frequencies follow softmax(logits / T) (T = 2 flattens the distribution).
    draws = next_tokens(logits, 2.0, 1.0, gen)
    want = torch.softmax(probs.log() / 2, dim=0)
    assert torch.allclose(torch.bincount(draws, minlength=4) / 4000, want, atol=0.03)
    assert next_tokens(torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 5.0]]), 0.0, 1.0,
                       None).tolist() == [1, 0]


@pytest.mark.parametrize("temperature, top_p", [(-0.1, 1.0), (float("nan"), 1.0),
                                                (float("inf"), 1.0), (1.0, 0.0),
                                                (1.0, 1.5), (1.0, -0.2), (1.0, float("nan"))])
def test_bad_sampling_values_are_refused(temperature: float, top_p: float) -> None:
    with pytest.raises(DataError, match="temperature|top_p"):
        check_sampling(temperature, top_p)


def test_prompts_are_checked() -> None:
    check_prompts([[1], [1, 2, 3]], max_length=4)
    with pytest.raises(DataError, match="prompt 2 is empty"):
        check_prompts([[1], []], max_length=4)
    with pytest.raises(DataError, match="prompt 1 has 4 tokens"):
        check_prompts([[1, 2, 3, 4]], max_length=4)


@pytest.mark.slow
def test_cli_prints_each_completion(probe: dict, capsys) -> None:
    # The CLI ran in the probe process on prompts.txt (the first three prompts, blank lines
    # between them, which are not prompts), after the library's own generations there.
    assert probe["cli"]["code"] == 0, probe["cli"]["stdout"][-3000:]
    records = [json.loads(line) for line in probe["cli"]["stdout"].splitlines()]
    assert [r["prompt"] for r in records] == PROMPTS[:3]
    assert [r["prompt_ids"] for r in records] == probe["prompts"][:3]
    assert [r["completion_ids"] for r in records] == probe["batched"][:3]
    for r in records:
        assert r["text"] == r["prompt"] + r["completion"] and r["completion"]
        assert r["stop"] == ("length" if len(r["completion_ids"]) == NEW else "eos")
    show(records, as_json=False)  # the default output of the same records
    blocks = capsys.readouterr().out.split("=== prompt ")[1:]
    assert [b.split(" ===\n", 1) for b in blocks] == [
        [str(n), r["text"] + "\n\n"] for n, r in enumerate(records, 1)]


def _tokenizer_larger_than_the_model(tmp_path: Path) -> str:
    """A real BPE tokenizer with more ids than the model's 4096 (not the one it learned)."""
    from megatron_ext.data.tokenizer_training import train_bpe_tokenizer

    corpus = REPO / "data" / "corpus"
    text = tmp_path / "text.txt"
    text.write_text((corpus / "en_shakespeare.txt").read_text(encoding="utf-8")[:400_000]
                    + (corpus / "ja_neko.txt").read_text(encoding="utf-8")[:200_000],
                    encoding="utf-8")
    return str(train_bpe_tokenizer([str(text)], 4400, str(tmp_path / "big-tok")))


def _one_line_exit_2(argv: list[str], capsys, needle: str) -> None:
    assert generate_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


@pytest.mark.slow
def test_cli_bad_inputs_exit_2_with_one_line(ckpt: Path, forked: dict, tmp_path: Path,
                                             capsys) -> None:
    # In-process (each fault is found before any model or process group exists), plus one
    # real process (forked["no prompts"]) to show the exit status and stderr exactly as a
    # user sees them.
    good, empty = str(ckpt / "ckpt"), forked["empty"]
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00abc\n")
    big_tokenizer = _tokenizer_larger_than_the_model(tmp_path)
    cases = [
        (["--checkpoint", good, "--tokenizer", big_tokenizer, "--prompt", "a"],
         "more than the model's vocabulary"),
        (["--checkpoint", str(tmp_path / "nope"), "--prompt", "a"], "nope: not found"),
        (["--checkpoint", good, "--prompts", str(empty)], "no prompts"),
        (["--checkpoint", good, "--prompts", str(tmp_path / "missing.txt")], "missing.txt"),
        (["--checkpoint", good, "--prompts", str(binary)], "not UTF-8"),
        (["--checkpoint", good, "--prompt", ""], "is empty"),
        (["--checkpoint", good, "--prompt", "to be " * 300], "no room to generate"),
        (["--checkpoint", good, "--prompt", "a", "--temperature", "-1"], "temperature"),
        (["--checkpoint", good, "--prompt", "a", "--top-p", "0"], "--top-p"),
        (["--checkpoint", good, "--prompt", "a", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["--checkpoint", good, "--prompt", "a", "--prompts", str(empty)], "not allowed with"),
    ]
    for argv, needle in cases:
        _one_line_exit_2(argv, capsys, needle)
    proc = forked["no prompts"]
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert proc.stderr == f"error: {empty}: no prompts (the file has no non-empty line)\n"


@pytest.mark.slow
def test_throughput_bench_runs_and_compares_ids(ckpt: Path, forked: dict) -> None:
    out = _ok(forked["bench"])
    rows = [line.split("|") for line in out.splitlines() if line.startswith(f"| {ckpt}")]
    assert [r[2].strip() for r in rows] == ["1", "3"]
    assert all(r[-2].strip() == "yes" and float(r[3]) > 0 and float(r[4]) > 0 for r in rows)
