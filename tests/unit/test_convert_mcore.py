"""moe-hf-to-mcore and moe-mcore-to-hf (megatron_ext.cli) end to end on tiny fp32 models.

Every conversion runs in a process of its own (it owns a gloo world of one); the module fixture
converts Llama, Mixtral and a mixed dense/MoE model both ways once, with validation on, and the
tests inspect the results. The tools run forked from one driver (tests.forkrun): one driver
for the module, not twenty-odd interpreters that each import torch and megatron.
Vocab 250 is not a multiple of 128: the mcore side pads it to 256.
"""

from __future__ import annotations

import re
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.forkrun import run_clis

HF_TO_MCORE = ["-m", "megatron_ext.cli.hf_to_mcore"]
MCORE_TO_HF = ["-m", "megatron_ext.cli.mcore_to_hf"]
UPCYCLE = ["-m", "megatron_ext.cli.upcycle"]
SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=250)
KINDS = ("llama", "mixtral", "mixed")


def _make_hf(root: Path) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    from megatron_ext.upcycling.convert import upcycle_checkpoint
    from megatron_ext.upcycling.spec import UpcycleSpec

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SHAPE)).save_pretrained(root / "llama")
    (root / "llama" / "tokenizer.json").write_text('{"version": "1.0"}')
    MixtralForCausalLM(MixtralConfig(**SHAPE, num_local_experts=4, num_experts_per_tok=2)
                       ).save_pretrained(root / "mixtral")
    # HF -> HF only (no megatron, no process group): safe inside the pytest process.
    upcycle_checkpoint(root / "llama", root / "mixed",
                       UpcycleSpec(method="drop", ratio=0.5, num_experts=4, moe_layers={1}),
                       validate=False, log=lambda _: None)
    return {k: root / k for k in KINDS}


def _max_diff(stdout: str) -> float:
    m = re.search(r"validation: max \|logit diff\| = (\S+) .*PASS", stdout)
    assert m, stdout
    return float(m.group(1))


@pytest.fixture(scope="module")
def forked(tmp_path_factory) -> dict:
    """Every process of the module, in order, forked from one driver (tests.forkrun): the six
    conversions, the truncated copy of a converted checkpoint (``PREP``), the tools and the bad
    inputs that read them. {"conv": {kind: {hf, mcore, back, fwd, rev}}, "tools": {root, runs,
    bad}}."""
    root = tmp_path_factory.mktemp("convert_mcore")
    conv, calls = {}, []
    for kind, hf in _make_hf(root).items():
        mc, back = root / f"{kind}_mcore", root / f"{kind}_back"
        # One validation of the mixed model (load_moe) is enough: save a few seconds.
        skip = ["--skip-validation"] if kind == "mixed" else []
        calls += [[*HF_TO_MCORE, "--input", str(hf), "--output", str(mc), *skip],
                  [*MCORE_TO_HF, "--input", str(mc), "--output", str(back)]]
        conv[kind] = {"hf": hf, "mcore": mc, "back": back}
    tools_root = root / "tools"
    (tools_root / "strict").mkdir(parents=True)
    (tools_root / "prep.py").write_text(PREP)
    calls.append([str(tools_root / "prep.py"), str(conv["llama"]["mcore"]),
                  str(tools_root / "bad" / "truncated_mcore")])
    named = _tool_calls(conv, tools_root)
    bad = _bad_inputs(conv, tools_root / "bad")
    for n, (case, (cli, args, _)) in enumerate(bad.items()):
        out = tools_root / "bad" / f"out{n}"
        named[case] = [*cli, *args] if "--output" in args else [*cli, *args, "--output", str(out)]
    runs = run_clis(calls + list(named.values()), root / "runs")
    for i, kind in enumerate(KINDS):
        for key, r in zip(("fwd", "rev"), runs[2 * i:2 * i + 2]):
            conv[kind][key] = r
    assert runs[6].returncode == 0, runs[6].stderr[-3000:]
    return {"conv": conv,
            "tools": {"root": tools_root, "runs": dict(zip(named, runs[7:])), "bad": bad}}


@pytest.fixture(scope="module")
def conv(forked) -> dict[str, dict]:
    out = {}
    for kind, c in forked["conv"].items():
        for key in ("fwd", "rev"):
            assert c[key].returncode == 0, c[key].stdout[-2000:] + c[key].stderr[-3000:]
        out[kind] = {**c, "fwd": c["fwd"].stdout, "rev": c["rev"].stdout}
    return out


def assert_bit_exact(a_dir: Path, b_dir: Path) -> None:
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_bit_exact(conv, kind: str) -> None:
    c = conv[kind]
    assert_bit_exact(c["hf"], c["back"])  # GQA: 2 kv heads for 4 query heads
    config = (c["back"] / "config.json").read_text()
    arch = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM",
            "mixed": "MixtralForCausalLM"}[kind]
    assert arch in config and ('"mlp_only_layers"' in config) == (kind == "mixed")
    assert sorted(p.name for p in c["mcore"].iterdir()) == [
        "config.yaml", "hf", "iter_0000000", "latest"]
    if kind == "llama":
        assert (c["back"] / "tokenizer.json").is_file()  # carried through hf/
    if kind == "mixed":
        assert "stock MixtralForCausalLM" in c["rev"] and "cannot" in c["rev"]
    # Validated against transformers, fp32, on CPU (both directions but for mixed).
    assert _max_diff(c["rev"]) <= 1e-4
    assert kind == "mixed" or _max_diff(c["fwd"]) <= 1e-4


LOGITS = textwrap.dedent("""
    import sys, torch
    from transformers import LlamaForCausalLM, MixtralForCausalLM
    from megatron_ext.checkpoint.load_model import load_model
    from megatron_ext.model.inference import logits
    from megatron_ext.platform.dist import shutdown

    if __name__ == "__main__":
        for cls, hf, mcore in ((LlamaForCausalLM, *sys.argv[1:3]),
                               (MixtralForCausalLM, *sys.argv[3:5])):
            tokens = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(1))
            ref = cls.from_pretrained(hf, dtype=torch.float32).eval()(tokens).logits
            cfg, model = load_model(mcore, expert_parallel=1)
            got = logits(model, tokens)
            shutdown()
            assert got.shape[-1] == 256 and cfg.model.vocab_size == 250, got.shape
            print(cls.__name__, (got[..., :250] - ref).abs().max().item(),
                  got[..., 250:].abs().max().item())
""")


def test_config_from_hf(conv) -> None:
    import json

    from megatron_ext.conversion.keymaps import ConversionError
    from megatron_ext.conversion.mcore_io import config_from_hf

    mixed = json.loads((conv["mixed"]["hf"] / "config.json").read_text())
    cfg = config_from_hf(mixed, {"train.seed": 5})
    assert (cfg.model.num_kv_heads, cfg.model.vocab_size, cfg.moe.num_experts) == (2, 250, 4)
    assert cfg.moe.layer_freq == [0, 1] and not cfg.data.mock and cfg.train.seed == 5
    mixtral = json.loads((conv["mixtral"]["hf"] / "config.json").read_text())
    assert config_from_hf(mixtral).moe.aux_loss_coeff == mixtral["router_aux_loss_coef"]
    for bad, match in (({"head_dim": 32}, "head_dim"), ({"rope_theta": 10000.5,
                       "rope_parameters": None}, "rope_theta"), ({"sliding_window": 64},
                       "sliding_window")):
        with pytest.raises(ConversionError, match=match):
            config_from_hf({**mixtral, **bad})


STRICT = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from megatron_ext.conversion.hf_io import HFCheckpoint
    from megatron_ext.conversion.keymaps import ConversionError, arch_from_hf_config, hf_to_mcore
    from megatron_ext.conversion.mcore_io import (
        config_from_hf, read_mcore_checkpoint, write_mcore_checkpoint)

    if __name__ == "__main__":
        hf, out = HFCheckpoint(sys.argv[1]), Path(sys.argv[2])
        arch, cfg = arch_from_hf_config(hf.config), config_from_hf(hf.config)
        full = list(hf_to_mcore(hf.get, arch))
        name, t = full[3]
        for case, stream in {"missing": full[:-1], "twice": full + full[:1],
                             "extra": full + [("bogus.weight", t)],
                             "shape": full[:3] + [(name, t[:, :-1])] + full[4:]}.items():
            try:
                write_mcore_checkpoint(iter(stream), cfg, out / case)
                print(case, "WROTE")
            except ConversionError as e:
                print(case, (out / case).exists(), e)
        root = write_mcore_checkpoint(iter(full), cfg, out / "ok")
        get, keys, arch2, _ = read_mcore_checkpoint(root)
        assert arch2 == arch and sorted(keys) == sorted(n for n, _ in full)
        assert all(torch.equal(get(n), x) for n, x in full)  # vocab padding cut off again
        print("read back ok")

        # A failed validation: exit 1 and nothing at the output (the check itself is faked).
        import megatron_ext.conversion.convert as convert
        from megatron_ext.model.compare import ValidationReport
        from megatron_ext.cli.hf_to_mcore import main
        convert.compare_logits = lambda *a, **k: ValidationReport(1.0, 1.0, True, True, 1e-4)
        rc = main(["--input", sys.argv[1], "--output", str(out / "vfail")])
        print("vfail", rc, (out / "vfail").exists(), len(list(out.glob(".vfail*"))))
""")


# Run in the driver once the llama conversion exists: a copy of it with one shard truncated.
PREP = textwrap.dedent("""
    import shutil, sys
    from pathlib import Path

    shutil.copytree(sys.argv[1], sys.argv[2])
    shard = sorted((Path(sys.argv[2]) / "iter_0000000").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
""")


def _bad_inputs(conv, root: Path) -> dict[str, tuple[str, list[str], str]]:
    """The bad inputs; ``root/truncated_mcore`` is made by ``PREP`` in the driver."""
    truncated_hf = root / "truncated_hf"
    shutil.copytree(conv["llama"]["hf"], truncated_hf)
    weights = truncated_hf / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    truncated_mc = root / "truncated_mcore"
    existing = root / "existing"
    existing.mkdir()
    (existing / "keep").write_text("mine")
    return {
        "h missing": (HF_TO_MCORE, ["--input", str(root / "nope")], "does not exist"),
        "h not hf": (HF_TO_MCORE, ["--input", str(conv["llama"]["mcore"])], "no config.json"),
        "h truncated": (HF_TO_MCORE, ["--input", str(truncated_hf)], "truncated"),
        "h exists": (HF_TO_MCORE, ["--input", str(conv["llama"]["hf"]), "--output",
                                   str(existing)], "--overwrite"),
        "m missing": (MCORE_TO_HF, ["--input", str(root / "nope")], "does not exist"),
        "m not mcore": (MCORE_TO_HF, ["--input", str(conv["llama"]["hf"])],
                        "no checkpoint found"),
        "m truncated": (MCORE_TO_HF, ["--input", str(truncated_mc)], "truncated or damaged"),
        "m exists": (MCORE_TO_HF, ["--input", str(conv["llama"]["mcore"]), "--output",
                                   str(existing)], "--overwrite"),
        "m shard size": (MCORE_TO_HF, ["--input", str(conv["llama"]["mcore"]),
                                       "--max-shard-size", "big"], "bad size"),
    }


def _tool_calls(conv, root: Path) -> dict[str, list[str]]:
    llama, mixtral, mixed = (conv[k] for k in KINDS)
    (root / "logits.py").write_text(LOGITS)
    (root / "strict.py").write_text(STRICT)
    return {
        "logits": [str(root / "logits.py"), str(llama["hf"]), str(llama["mcore"]),
                   str(mixtral["hf"]), str(mixtral["mcore"])],
        "pretrain": ["pretrain_moe.py", "--config", str(mixtral["mcore"] / "config.yaml"),
                     "--set", f"checkpoint.load={mixtral['mcore']}", "--set", "data.mock=true",
                     "--set", "train.train_steps=2", "--set", "schedule.warmup_steps=1",
                     "--set", "data.seq_length=32", "--set", f"logging.output_dir={root}/run"],
        "naive": [*UPCYCLE, "--input", str(llama["hf"]), "--output", str(root / "moe"),
                  "--method", "naive", "--num-experts", "4", "--top-k", "2",
                  "--output-format", "mcore"],
        "strict": [str(root / "strict.py"), str(mixed["hf"]), str(root / "strict")],
        "from_mc": [*UPCYCLE, "--input", str(llama["mcore"]), "--output", str(root / "from_mc"),
                    "--method", "drop", "--ratio", "0.5", "--num-experts", "4", "--seed", "7",
                    "--output-format", "hf", "--skip-validation"],
        # Without --output-format the output keeps the input's format (a megatron checkpoint).
        "same": [*UPCYCLE, "--input", str(llama["mcore"]), "--output", str(root / "same"),
                 "--method", "naive", "--num-experts", "2", "--skip-validation"],
    }


@pytest.fixture(scope="module")
def tools(conv, forked) -> dict:
    """Every tool run below and each bad input (with its own --output): run by ``forked``."""
    return forked["tools"]


def _out(tools: dict, name: str) -> str:
    r = tools["runs"][name]
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def test_mcore_logits_equal_transformers(tools) -> None:
    out = _out(tools, "logits")
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines()[-2:])
    for cls in ("LlamaForCausalLM", "MixtralForCausalLM"):
        diff, padded = map(float, lines[cls].split())
        assert diff <= 1e-4, (cls, diff)
        assert padded == 0.0  # zero-filled padding rows give zero logits


def test_pretrain_starts_from_converted_mixtral(tools) -> None:
    out = _out(tools, "pretrain")
    assert "initial weights from" in out and "step 2/2" in out and out.startswith("MOCK DATA")


def test_upcycle_to_mcore_naive_keeps_the_dense_function(tools) -> None:
    out, moe = _out(tools, "naive"), tools["root"] / "moe"
    assert _max_diff(out) <= 1e-5
    assert (moe / "latest").is_file() and (moe / "config.yaml").is_file()


def test_write_is_strict_and_read_returns_the_stream(tools) -> None:
    out = _out(tools, "strict").strip().splitlines()
    got = {line.split(" ", 1)[0]: line for line in out}
    for case, match in (("missing", "missing tensor output_layer.weight"),
                        ("twice", "given twice"), ("extra", "unexpected tensor bogus.weight"),
                        ("shape", "has shape")):
        assert got[case].startswith(f"{case} False") and match in got[case], got[case]
    assert "read back ok" in out and out[-1] == "vfail 1 False 0"


def test_upcycle_from_mcore_equals_upcycle_from_hf(conv, tools, tmp_path: Path) -> None:
    from megatron_ext.upcycling.convert import upcycle_checkpoint
    from megatron_ext.upcycling.spec import UpcycleSpec

    recipe = dict(method="drop", ratio=0.5, num_experts=4, seed=7)
    upcycle_checkpoint(conv["llama"]["hf"], tmp_path / "from_hf", UpcycleSpec(**recipe),
                       validate=False, log=lambda _: None)
    _out(tools, "from_mc")
    root = tools["root"]
    assert_bit_exact(tmp_path / "from_hf", root / "from_mc")
    _out(tools, "same")
    assert (root / "same" / "latest").is_file()
    assert (root / "from_mc" / "tokenizer.json").is_file()  # from the mcore root's hf/


def test_bad_inputs_exit_2_with_one_line(tools) -> None:
    bad_dir = tools["root"] / "bad"
    for case, (_, _, match) in tools["bad"].items():
        r = tools["runs"][case]
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and match in lines[0], (case, r.stderr)
    assert not list(bad_dir.glob("out*")) and not list(bad_dir.glob(".out*"))
    assert [p.name for p in (bad_dir / "existing").iterdir()] == ["keep"]
