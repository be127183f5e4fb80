"""Damaged safetensors files in an HF directory: every tool that reads one refuses it with one line
and exit 2, before anything is written, whatever the damage.

The class: a header the safetensors library would refuse (negative, string or overflowing
dimensions, float offsets, offsets that overlap or run past the data, a ``__metadata__`` that is
not a map of strings, an unknown dtype, not JSON), a file that ends too soon or too late, an
index that does not map names to shard files here, and tensors that are not floating point
where weights belong. One mechanism catches them all (``conversion.hf_io``, the library's own
reader); each case goes through the library and through the real CLIs that read HF directories.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from megatron_ext.cli import compare_inits, hf_to_mcore, lm_eval, upcycle
from megatron_ext.conversion.hf_io import INDEX_NAME, SINGLE_NAME, HFCheckpoint
from megatron_ext.conversion.keymaps import ConversionError
from tests.conftest import REPO, run_cli

EMBED = "model.embed_tokens.weight"
Header = dict


def _split(path: Path) -> tuple[Header, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: Header, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


def _header(edit: Callable[[Header], None]) -> Callable[[bytes], bytes]:
    def damage(raw: bytes) -> bytes:
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        edit(header)
        return _join(header, raw[8 + n:])
    return damage


def _set(name: str, key: str, value: Callable[[list], object]) -> Callable[[Header], None]:
    def edit(header: Header) -> None:
        header[name][key] = value(header[name][key])
    return edit


def _by_offset(header: Header) -> list[str]:
    return sorted((n for n in header if n != "__metadata__"),
                  key=lambda n: header[n]["data_offsets"][0])


def _overlap(header: Header) -> None:
    second = _by_offset(header)[1]
    header[second]["data_offsets"] = [x - 2 for x in header[second]["data_offsets"]]


def _past_the_data(header: Header) -> None:
    last = _by_offset(header)[-1]
    header[last]["data_offsets"][1] += 64


def _not_json(raw: bytes) -> bytes:
    n = int.from_bytes(raw[:8], "little")
    return raw[:8] + b"{" * n + raw[8 + n:]


# case: (damage of model.safetensors' bytes, or of the index; what the one line must say)
WEIGHTS = {
    "negative dimension": (_header(_set(EMBED, "shape", lambda s: [-s[0], s[1]])), "usize"),
    "string dimensions": (_header(_set(EMBED, "shape", lambda s: [str(x) for x in s])), "usize"),
    "dimensions overflow": (_header(_set(EMBED, "shape", lambda s: [2**40, 2**40])), "overflow"),
    "float offsets": (_header(_set(EMBED, "data_offsets", lambda o: [float(x) for x in o])),
                      "floating point"),
    "overlapping offsets": (_header(_overlap), "invalid offset"),
    "offsets past the data": (_header(_past_the_data), "corrupt safetensors header"),
    "metadata a list": (_header(lambda h: h.update(__metadata__=["pt"])), "expected a map"),
    "metadata not strings": (_header(lambda h: h.update(__metadata__={"format": 1})),
                             "expected a string"),
    "unknown dtype": (_header(_set(EMBED, "dtype", lambda d: "Q7")), "unknown variant"),
    "integer weight": (_header(_set(EMBED, "dtype", lambda d: "I16")),
                       f"{EMBED} is I16, not a floating-point weight"),
    "unsigned weight": (_header(_set(EMBED, "dtype", lambda d: "U16")),
                        "not a floating-point weight"),
    "header not JSON": (_not_json, "corrupt safetensors header"),
    "truncated": (lambda raw: raw[:-1], "truncated safetensors file"),
    "trailing bytes": (lambda raw: raw + b"\0" * 8, "8 unexpected trailing bytes"),
}
INDEXES = {  # model.safetensors intact, an index beside it
    "weight_map a list": ({"weight_map": [SINGLE_NAME]}, "invalid index file"),
    "weight_map an int": ({"weight_map": {EMBED: 3}}, "invalid index file"),
    "shard outside the directory": ({"weight_map": {EMBED: f"../x/{SINGLE_NAME}"}},
                                    "invalid index file"),
    "index a list": ([], "invalid index file"),
}
CASES = [*WEIGHTS, *INDEXES]
FLOAT_ONLY = {"integer weight", "unsigned weight"}  # lm-eval reads any HF model: dtypes free


def damaged(dense: Path, root: Path, case: str) -> Path:
    out = root / case.replace(" ", "_")
    shutil.copytree(dense, out)
    if case in WEIGHTS:
        file = out / SINGLE_NAME
        file.write_bytes(WEIGHTS[case][0](file.read_bytes()))
    else:
        (out / INDEX_NAME).write_text(json.dumps(INDEXES[case][0]))
    return out


def expected(case: str) -> str:
    return (WEIGHTS.get(case) or INDEXES[case])[1]


def test_intact_directory_reads(hf_llama: Path) -> None:
    ckpt = HFCheckpoint(hf_llama)
    assert ckpt.info(EMBED).shape == (256, 64) and ckpt.info(EMBED).dtype == torch.bfloat16
    assert torch.equal(ckpt.get(EMBED), ckpt.get(EMBED))


@pytest.mark.parametrize("case", CASES)
def test_library_refuses_with_one_line(hf_llama: Path, tmp_path: Path, case: str) -> None:
    path = damaged(hf_llama, tmp_path, case)
    with pytest.raises(ConversionError) as err:
        HFCheckpoint(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and expected(case) in message, message


def _tools(path: Path, out: Path) -> dict[str, tuple[object, list[str]]]:
    return {
        "upcycle": (upcycle, ["--input", str(path), "--output", str(out), "--num-experts", "2",
                              "--method", "naive", "--skip-validation"]),
        "hf_to_mcore": (hf_to_mcore, ["--input", str(path), "--output", str(out),
                                      "--skip-validation"]),
        "compare_inits": (compare_inits, [
            "--config", str(REPO / "configs/tiny-cpu.yaml"), "--set", "model.hidden_size=64",
            "--methods", "naive", "--tokens", "100000", "--dense", str(path),
            "--output", str(out)]),
        "lm_eval": (lm_eval, ["--checkpoint", str(path), "--hf", "--tasks", "demo_en_mc",
                              "--output", str(out)]),
    }


@pytest.mark.parametrize("case", CASES)
def test_every_tool_that_reads_hf_refuses_with_one_line(hf_llama: Path, tmp_path: Path, case: str,
                                                        capsys, keep_sigterm) -> None:
    path = damaged(hf_llama, tmp_path, case)
    before = sorted(p.name for p in tmp_path.iterdir())
    for tool, (module, argv) in _tools(path, tmp_path / "out").items():
        if tool == "lm_eval" and case in FLOAT_ONLY:
            continue
        code = module.main(argv)
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(err) == 1, (tool, code, err)
        assert err[0].startswith("error: ") and expected(case) in err[0], (tool, err[0])
        assert sorted(p.name for p in tmp_path.iterdir()) == before, tool  # nothing written


@pytest.mark.parametrize("tool", ["upcycle", "hf_to_mcore"])
def test_a_real_process_gets_one_line_and_exit_2(hf_llama: Path, tmp_path: Path, tool: str) -> None:
    path = damaged(hf_llama, tmp_path, "negative dimension")
    module, argv = _tools(path, tmp_path / "out")[tool]
    proc = run_cli(["-m", module.__name__, *argv], timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "usize" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()
