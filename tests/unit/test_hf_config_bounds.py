"""A Hugging Face directory's JSON is bounded before use (issue 24, class 1): a ``config.json``
or ``model.safetensors.index.json`` that is not a mapping, too large, not UTF-8, nested past
the parser, or holds a value outside what the config tree allows for the field it becomes
(``hidden_size: 1e9``, ``num_hidden_layers: 2.5``, ``rope_theta: NaN``, a 5000-digit integer,
a string where a flag belongs...) is one line naming the file and the key, exit 2, before
anything is sized or written. One mechanism (``conversion.hf_config``); each case goes through
the library and through every real CLI that reads HF directories; one in a real process under
an address-space limit and a time limit."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from megatron_ext.conversion.hf_config import (
    MAX_JSON_BYTES,
    MAX_TENSORS,
    check_hf_config,
    read_hf_config,
)
from megatron_ext.conversion.hf_io import INDEX_NAME, SINGLE_NAME, HFCheckpoint
from megatron_ext.conversion.keymaps import ConversionError, arch_from_hf_config
from megatron_ext.conversion.mcore_io import config_from_hf, hf_record
from tests.conftest import run_limited
from tests.unit.test_safetensors_damage import EMBED, _tools

MAX_LINE = 300  # characters a message may add to the paths it names


def _set(**values) -> Callable[[dict], str]:
    return lambda c: json.dumps({**c, **values})


def _raw(text: str | bytes) -> Callable[[dict], str | bytes]:
    return lambda c: text


def _rope(theta) -> Callable[[dict], str]:
    return lambda c: json.dumps({**c, "rope_parameters": {"rope_type": "default",
                                                          "rope_theta": theta}})


# case: (the config.json's new content from the intact one, what the one line says)
CONFIGS: dict[str, tuple[Callable[[dict], str | bytes], str]] = {
    "a list": (lambda c: json.dumps([c]), "invalid HF config (expected a JSON object, got list"),
    "a string": (_raw('"llama"'), "expected a JSON object, got str"),
    "hidden_size 1e9": (_set(hidden_size=1e9),
                        "hidden_size: expected an integer (model.hidden_size), got 1000000000.0"),
    "hidden_size 10**9": (_set(hidden_size=10**9),
                          "hidden_size: must be <= 65536 (model.hidden_size), got 1000000000"),
    "num_hidden_layers 1e6": (_set(num_hidden_layers=10**6),
                              "num_hidden_layers: must be <= 1024 (model.num_layers)"),
    "num_hidden_layers 2.5": (_set(num_hidden_layers=2.5),
                              "num_hidden_layers: expected an integer (model.num_layers), got 2.5"),
    "rope_theta NaN": (_set(rope_theta=float("nan")), "rope_theta: must be a finite number"),
    "rope_theta Infinity": (_rope(float("inf")),
                            "rope_parameters.rope_theta: must be a finite number"),
    "rope_theta 1": (_rope(1), "must be >= 2 (model.rotary_base), got 1"),
    "rms_norm_eps 0": (_set(rms_norm_eps=0), "rms_norm_eps: must be > 0 (model.norm_epsilon)"),
    "heads 0": (_set(num_attention_heads=0), "num_attention_heads: must be >= 1"),
    "kv heads true": (_set(num_key_value_heads=True), "num_key_value_heads: expected an integer"),
    "ffn a string": (_set(intermediate_size="128"), "intermediate_size: expected an integer"),
    "vocab 2**40": (_set(vocab_size=2**40), "vocab_size: must be <= 2147483647"),
    "positions 2**40": (_set(max_position_embeddings=2**40),
                        "max_position_embeddings: must be <= 4194304"),
    "experts 1e6": (_set(num_local_experts=10**6), "num_local_experts: must be <= 1024"),
    "top-k 2.5": (_set(num_experts_per_tok=2.5), "num_experts_per_tok: expected an integer"),
    "aux coef -1": (_set(router_aux_loss_coef=-1), "router_aux_loss_coef: must be >= 0"),
    "head_dim 0": (_set(head_dim=0), "head_dim: must be >= 1, got 0"),
    "tied a string": (_set(tie_word_embeddings="false"),
                      "tie_word_embeddings: expected true/false, got 'false'"),
    "model_type a list": (_set(model_type=["llama"]), "model_type: expected a name"),
    "bos 2**70": (_set(bos_token_id=2**70), "bos_token_id: must be <= 2147483647, got 1.180e+21"),
    "eos 100k ids": (_set(eos_token_id=[1] * 100_000), "eos_token_id: 100,000 ids, at most 64"),
    "eos a float": (_set(eos_token_id=[1, 2.5]), "eos_token_id item 1: expected an integer"),
    "hf_llama layer past the end": (_set(mlp_only_layers=[5]),
                                 "mlp_only_layers item 0: must be <= 1, got 5"),
    "rope_scaling a list": (_set(rope_scaling=[1]), "rope_scaling: expected a mapping"),
    "5000 digits": (lambda c: json.dumps(c)[:-1] + ', "hidden_size": ' + "9" * 5000 + "}",
                    "Exceeds the limit (4300 digits)"),
    "nested 100k deep": (_raw('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"),
                         "JSON nested too deeply"),
    "not UTF-8": (_raw(b'{"model_type": "\xff"}'), "not UTF-8: byte 0xff at offset 16"),
    "not JSON": (_raw("{"), "not JSON: Expecting property name enclosed in double quotes"),
    "empty": (_raw(""), "not JSON: Expecting value at line 1 column 1"),
    "17 MiB": (_raw('{"a": "' + "x" * (MAX_JSON_BYTES + 1) + '"}'),
               "invalid HF config (larger than 16 MiB)"),
    "a FIFO": (None, "invalid HF config (not a regular file)"),  # type: ignore[dict-item]
}
# an index beside model.safetensors (what test_safetensors_damage does not already cover)
INDEXES: dict[str, tuple[Callable[[], str | bytes] | None, str]] = {
    "weight_map a string": (lambda: json.dumps({"weight_map": SINGLE_NAME}),
                            "invalid index file (weight_map must map"),
    "absolute shard path": (lambda: json.dumps({"weight_map": {EMBED: "/etc/passwd"}}),
                            "'/etc/passwd'"),
    "shard '..'": (lambda: json.dumps({"weight_map": {EMBED: ".."}}), "invalid index file"),
    "too many tensors": (lambda: json.dumps({"weight_map": {
        f"{i:x}": "a" for i in range(MAX_TENSORS + 1)}}, separators=(",", ":")),
        f"invalid index file ({MAX_TENSORS + 1:,} tensors, at most {MAX_TENSORS:,})"),
    "17 MiB": (lambda: '{"a": "' + "x" * (MAX_JSON_BYTES + 1) + '"}',
               "invalid index file (larger than 16 MiB)"),
    "not UTF-8": (lambda: b"\xfe\xff", "invalid index file (not UTF-8"),
    "a FIFO": (None, "invalid index file (not a regular file)"),
}
CASES = [f"config: {c}" for c in CONFIGS] + [f"index: {c}" for c in INDEXES]
SLOW = {"index: too many tensors"}  # 13 MB of JSON to parse: through the library only


def damaged(hf_llama: Path, root: Path, case: str) -> Path:
    out = root / "".join(ch if ch.isalnum() else "_" for ch in case)
    shutil.copytree(hf_llama, out)
    damage(out, case)
    return out


def damage(out: Path, case: str) -> None:
    """Replace the config or the index of the HF directory ``out`` as ``case`` says."""
    kind, name = case.split(": ", 1)
    target = out / ("config.json" if kind == "config" else INDEX_NAME)
    make = CONFIGS[name][0] if kind == "config" else INDEXES[name][0]
    if make is None:
        target.unlink(missing_ok=True)
        os.mkfifo(target)
        return
    content = make(json.loads(target.read_text())) if kind == "config" else make()
    target.write_bytes(content if isinstance(content, bytes) else content.encode())


def expected(case: str) -> str:
    kind, name = case.split(": ", 1)
    return (CONFIGS if kind == "config" else INDEXES)[name][1]


def bounded(message: str, *paths: Path) -> str:
    for p in paths:
        message = message.replace(str(p), "<path>")
    assert "\n" not in message and len(message) < MAX_LINE, message[:2000]
    return message


def test_intact_config_reads_unchanged(hf_llama: Path) -> None:
    raw = json.loads((hf_llama / "config.json").read_text())
    assert read_hf_config(hf_llama) == raw == HFCheckpoint(hf_llama).config
    assert arch_from_hf_config(check_hf_config(raw)).hidden_size == 64


@pytest.mark.parametrize("case", CASES)
def test_library_refuses_with_one_line(hf_llama: Path, tmp_path: Path, case: str) -> None:
    path = damaged(hf_llama, tmp_path, case)
    with pytest.raises(ConversionError) as err:
        HFCheckpoint(path)
    text = bounded(str(err.value), path)
    assert text.startswith("<path>/") and expected(case) in text, text


@pytest.mark.parametrize("case", [c for c in CASES if c not in SLOW])
def test_every_tool_that_reads_hf_refuses_with_one_line(hf_llama: Path, tmp_path: Path, case: str,
                                                        capsys, keep_sigterm) -> None:
    path = damaged(hf_llama, tmp_path, case)
    before = sorted(p.name for p in tmp_path.iterdir())
    for tool, (module, argv) in _tools(path, tmp_path / "out").items():
        code = module.main(argv)
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(err) == 1, (tool, code, err)
        assert err[0].startswith("error: ") and expected(case) in bounded(err[0], path), \
            (tool, err[0])
        assert sorted(p.name for p in tmp_path.iterdir()) == before, tool  # nothing written


@pytest.mark.parametrize("case", ["hidden_size 10**9", "num_hidden_layers 1e6"])
def test_a_real_process_refuses_at_once_within_a_memory_limit(hf_llama: Path, tmp_path: Path,
                                                              address_limit: int,
                                                              case: str) -> None:
    """The refusal comes before anything is sized from the value: under an address-space limit
    of the tool's imports plus 768 MiB (the tables of a million layers' tensors would not fit)
    and the test's time limit."""
    path = damaged(hf_llama, tmp_path, f"config: {case}")
    module, argv = _tools(path, tmp_path / "out")["upcycle"]
    proc = run_limited(["-m", module.__name__, *argv], address_limit, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert expected(f"config: {case}") in lines[0] and not (tmp_path / "out").exists()


def test_config_from_a_mapping_is_checked_too(hf_llama: Path) -> None:
    """``config_from_hf`` takes a mapping from anywhere (the Python API): the same checks."""
    raw = json.loads((hf_llama / "config.json").read_text())
    with pytest.raises(ConversionError, match=r"^config.json: num_hidden_layers: expected an "
                                              r"integer \(model.num_layers\), got 2.5$"):
        config_from_hf({**raw, "num_hidden_layers": 2.5})
    assert config_from_hf(raw).model.hidden_size == 64


@pytest.mark.parametrize("case", ["a list", "rope_theta NaN", "17 MiB", "a FIFO"])
def test_a_damaged_record_of_a_conversion_is_not_used(hf_llama: Path, tmp_path: Path,
                                                      case: str) -> None:
    """A converted checkpoint's ``hf/`` record (token ids, dtype) is read through the same
    reader; a damaged one is ignored (the checkpoint's own config describes the model)."""
    arch = arch_from_hf_config(json.loads((hf_llama / "config.json").read_text()))
    root = tmp_path / "ckpt"
    shutil.copytree(hf_llama, root / "hf")
    assert hf_record(root, arch) == root / "hf"
    damage(root / "hf", f"config: {case}")
    assert hf_record(root, arch) is None


@pytest.mark.parametrize("content, needle", [
    (None, "larger than 64 MiB"),  # a sparse file: no disk used
    ("[" * 100_000 + "]" * 100_000, "RecursionError"),
    ('{"step": ' + "9" * 5000 + "}", "ValueError"),
], ids=["huge", "deep", "digits"])
def test_a_checkpoint_manifest_is_read_within_bounds(tmp_path: Path, content, needle) -> None:
    """Our own manifest (a stranger's checkpoint's ``meta.json``) gets the same treatment."""
    from megatron_ext.checkpoint.manifest import MAX_META_BYTES, CheckpointError, read

    meta = tmp_path / "meta.json"
    if content is None:
        with open(meta, "wb") as f:
            f.truncate(MAX_META_BYTES + 10)
    else:
        meta.write_text(content)
    with pytest.raises(CheckpointError) as err:
        read(tmp_path, None)
    assert needle in bounded(str(err.value), tmp_path), str(err.value)[:300]
