"""The one reader of a Hugging Face directory's JSON: ``config.json`` (an input model's, or the
``hf/`` record a conversion keeps) and ``model.safetensors.index.json``.

A stranger's directory may hold anything there: a list instead of a mapping, ``hidden_size:
1e9``, ``num_hidden_layers: 2.5``, ``rope_theta: NaN``, a million-digit integer, a 10 GB file.
So each file is read within ``MAX_JSON_BYTES``, must be UTF-8 JSON holding a mapping, and every
field we use is checked before anything is sized from it:

* an architecture field is checked as the config field it becomes (``AS_FIELD``:
  ``hidden_size`` as ``model.hidden_size``, ...) by the config tree's own check
  (``config.loader.check_field``): the same types and declared bounds a YAML config gets;
* flags are true/false, names short strings, token ids and layer lists bounded integers;
* an index maps at most ``MAX_TENSORS`` tensor names to shard files in the same directory.

A problem is one ConversionError naming the file and the key, the value quoted short. Keys we
do not use are left alone (the file is bounded, and they are never copied to an output).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_ext.config.fields import INT32_MAX, Range, clip, short_repr
from megatron_ext.config.loader import ConfigError, check_field
from megatron_ext.conversion.keymaps import MLP_ONLY_LAYERS_FIELD as MLP_ONLY_LAYERS
from megatron_ext.conversion.keymaps import ConversionError

# A config.json is a few KiB and the index of a 400B-parameter model about 2 MiB: a file
# larger than this is not one of them (and is never read into memory whole).
MAX_JSON_BYTES = 16 << 20
MAX_TENSORS = 1 << 20  # tensor names in an index (a 400B model has ~100k)
_MAX_NAME = 1024  # characters of a tensor name, a shard file name, a model type

# HF config.json key -> the field of our config it becomes, checked as that field.
AS_FIELD = {
    "num_hidden_layers": "model.num_layers",
    "hidden_size": "model.hidden_size",
    "num_attention_heads": "model.num_attention_heads",
    "num_key_value_heads": "model.num_kv_heads",
    "intermediate_size": "model.ffn_hidden_size",
    "vocab_size": "model.vocab_size",
    "max_position_embeddings": "model.max_position_embeddings",
    "rope_theta": "model.rotary_base",
    "rms_norm_eps": "model.norm_epsilon",
    "num_local_experts": "moe.num_experts",
    "num_experts_per_tok": "moe.top_k",
    "router_aux_loss_coef": "moe.aux_loss_coeff",
}
FLAGS = ("tie_word_embeddings", "attention_bias", "mlp_bias")
NAMES = ("model_type", "hidden_act", "dtype", "torch_dtype")
# Integers with no config field of their own: (lo, hi). Token ids may be -1 (older configs
# say "no pad token" so); head_dim as wide as a model may be.
INTEGERS = {"bos_token_id": (-1, INT32_MAX), "pad_token_id": (-1, INT32_MAX),
            "head_dim": (1, 65536), "sliding_window": (0, 2**62)}
MAX_EOS_IDS = 64


def read_json(path: Path, what: str) -> dict[str, Any]:
    """The mapping the JSON file ``path`` holds, read within MAX_JSON_BYTES; otherwise one
    ConversionError ``path: invalid WHAT (why)``."""
    path = Path(path)
    if not path.is_file():  # a FIFO or a device would block or never end
        raise ConversionError(f"{path}: invalid {what} (not a regular file)")
    with open(path, "rb") as f:
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise ConversionError(f"{path}: invalid {what} (larger than {MAX_JSON_BYTES >> 20} MiB)")
    try:
        tree = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConversionError(f"{path}: invalid {what} (not UTF-8: byte 0x{data[e.start]:02x} "
                              f"at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: invalid {what} (not JSON: {e.msg} at line {e.lineno} "
                              f"column {e.colno})") from None
    except RecursionError:
        raise ConversionError(f"{path}: invalid {what} (JSON nested too deeply)") from None
    except ValueError as e:  # an integer past Python's digit limit
        raise ConversionError(f"{path}: invalid {what} ({clip(str(e))})") from None
    if not isinstance(tree, dict):
        raise ConversionError(f"{path}: invalid {what} (expected a JSON object, got "
                              f"{type(tree).__name__} {short_repr(tree)})")
    return tree


def read_hf_config(path: Path) -> dict[str, Any]:
    """An HF ``config.json`` (the file, or the directory holding it), read and checked."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    return check_hf_config(read_json(path, "HF config"), str(path))


def check_hf_config(config: Any, source: str = "config.json") -> dict[str, Any]:
    """A copy of ``config`` with every field we use checked (module docstring) and numbers as
    our config takes them; ConversionError ``source: key: why`` for the first problem."""
    if not isinstance(config, dict):
        raise ConversionError(f"{source}: expected a mapping, got {short_repr(config)}")
    out = dict(config)
    for key, dotted in AS_FIELD.items():
        if out.get(key) is not None:
            out[key] = _as_field(out[key], dotted, source, key)
    for key in FLAGS:
        if out.get(key) is not None and not isinstance(out[key], bool):
            raise ConversionError(f"{source}: {key}: expected true/false, got "
                                  f"{short_repr(out[key])}")
    for key in NAMES:
        if out.get(key) is not None and not (isinstance(out[key], str)
                                             and len(out[key]) <= _MAX_NAME):
            raise ConversionError(f"{source}: {key}: expected a name, got {short_repr(out[key])}")
    for key, (lo, hi) in INTEGERS.items():
        if out.get(key) is not None:
            _integer(out[key], lo, hi, source, key)
    eos = out.get("eos_token_id")
    if isinstance(eos, list):
        if len(eos) > MAX_EOS_IDS:
            raise ConversionError(f"{source}: eos_token_id: {len(eos):,} ids, at most "
                                  f"{MAX_EOS_IDS}")
        for i, x in enumerate(eos):
            _integer(x, -1, INT32_MAX, source, f"eos_token_id item {i}")
    elif eos is not None:
        _integer(eos, -1, INT32_MAX, source, "eos_token_id")
    layers = out.get(MLP_ONLY_LAYERS)
    if layers is not None:
        top = out.get("num_hidden_layers") or 1
        if not isinstance(layers, list) or len(layers) > top:
            raise ConversionError(f"{source}: {MLP_ONLY_LAYERS}: expected a list of at most "
                                  f"{top} layers, got {short_repr(layers)}")
        for i, x in enumerate(layers):
            _integer(x, 0, top - 1, source, f"{MLP_ONLY_LAYERS} item {i}")
    for key in ("rope_parameters", "rope_scaling"):
        if out.get(key) is not None and not isinstance(out[key], dict):
            raise ConversionError(f"{source}: {key}: expected a mapping, got "
                                  f"{short_repr(out[key])}")
    rope = out.get("rope_parameters")
    if rope:
        rope = out["rope_parameters"] = dict(rope)
        if rope.get("rope_theta") is not None:
            rope["rope_theta"] = _as_field(rope["rope_theta"], "model.rotary_base", source,
                                           "rope_parameters.rope_theta")
        if not isinstance(rope.get("rope_type", ""), str):
            raise ConversionError(f"{source}: rope_parameters.rope_type: expected a name, got "
                                  f"{short_repr(rope['rope_type'])}")
    return out


def _as_field(value: Any, dotted: str, source: str, key: str) -> Any:
    try:
        return check_field(dotted, value)
    except ConfigError as e:
        why = getattr(e, "why", str(e))
        why = why.replace(", got", f" ({dotted}), got", 1) if ", got" in why else why
        raise ConversionError(f"{source}: {key}: {why}") from None


def _integer(value: Any, lo: int, hi: int, source: str, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConversionError(f"{source}: {key}: expected an integer, got {short_repr(value)}")
    why = Range(lo, hi).problem(value)
    if why:
        raise ConversionError(f"{source}: {key}: {why}")


def read_index(path: Path) -> dict[str, str]:
    """The ``weight_map`` of an index file: tensor name -> shard file name in the index's own
    directory (no path, no ``..``), at most MAX_TENSORS of them."""
    path = Path(path)
    index = read_json(path, "index file")
    weight_map = index.get("weight_map")
    bad = "invalid index file (weight_map must map tensor names to shard file names in this " \
          "directory)"
    if not isinstance(weight_map, dict):
        raise ConversionError(f"{path}: {bad}, got {short_repr(weight_map)}")
    if len(weight_map) > MAX_TENSORS:
        raise ConversionError(f"{path}: invalid index file ({len(weight_map):,} tensors, at "
                              f"most {MAX_TENSORS:,})")
    for name, shard in weight_map.items():
        if not (len(name) <= _MAX_NAME and isinstance(shard, str) and len(shard) <= _MAX_NAME
                and shard == Path(shard).name and shard not in ("", ".", "..")):
            raise ConversionError(f"{path}: {bad}: {short_repr(name)} -> {short_repr(shard)}")
    return weight_map
