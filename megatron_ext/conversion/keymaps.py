"""Declarative key tables between HF Llama/Mixtral and our megatron-core (local spec) names.

One table (``RULES``) says, for every megatron-core tensor, which HF tensors it is made of and
how (``copy``, ``qkv`` fusion by query group, ``gate_up`` concatenation). Templates carry
``{layer}`` and ``{expert}`` placeholders. Dense layers use the Llama MLP names, MoE layers the
Mixtral ``block_sparse_moe`` names, so a model that mixes dense and MoE layers has one HF and one
mcore spelling too (HF Mixtral itself cannot load such a model; see ``MLP_ONLY_LAYERS_FIELD``).

Conversions are generators over a getter (``get(name) -> Tensor``): callers stream tensors from
safetensors shards one at a time, and each output tensor needs only its own inputs. Everything is
strict: missing or unexpected keys and wrong shapes raise ``ConversionError`` naming the key.

Shape legend: V vocab, H hidden, F d_ff, E experts, G query groups (kv heads), D head_dim.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from megatron_ext.errors import UserError

Getter = Callable[[str], Tensor]

# Non-standard config.json field recording the dense layers of a mixed dense/MoE model
# (the name Qwen2-MoE uses for the same idea). Absent when every layer is MoE.
MLP_ONLY_LAYERS_FIELD = "mlp_only_layers"


class ConversionError(UserError, ValueError):
    """A checkpoint does not match what the conversion expects; the message names the key."""


@dataclass(frozen=True)
class Arch:
    """The shapes a conversion needs. ``num_experts == 0`` means dense."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    num_experts: int = 0
    moe_layers: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        # Normalize so that Arch(moe_layers={0, 1}) compares equal to a frozenset-built one.
        object.__setattr__(self, "moe_layers", frozenset(self.moe_layers))
        if self.num_heads % self.num_kv_heads:
            raise ConversionError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.num_experts == 0 and self.moe_layers:
            raise ConversionError("moe_layers given for a dense model (num_experts = 0)")
        bad = sorted(i for i in self.moe_layers if not 0 <= i < self.num_layers)
        if bad:
            raise ConversionError(f"moe_layers {bad} outside 0..{self.num_layers - 1}")

    def is_moe(self, layer: int) -> bool:
        return self.num_experts > 0 and layer in self.moe_layers


# --- HF names -------------------------------------------------------------------------------
HF_EMBED = "model.embed_tokens.weight"
HF_FINAL_NORM = "model.norm.weight"
HF_LM_HEAD = "lm_head.weight"
_L = "model.layers.{layer}"
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def hf_layer(name: str) -> int | None:
    """The layer an HF tensor name belongs to (``model.layers.N.``), None outside the layers."""
    m = _HF_LAYER.match(name)
    return int(m.group(1)) if m is not None else None


HF_INPUT_NORM = f"{_L}.input_layernorm.weight"
HF_Q, HF_K, HF_V, HF_O = (f"{_L}.self_attn.{p}_proj.weight" for p in "qkvo")
HF_POST_ATTN_NORM = f"{_L}.post_attention_layernorm.weight"
# Llama dense MLP and Mixtral experts, keyed by role (w1 = gate, w3 = up, w2 = down).
HF_DENSE_MLP = {r: f"{_L}.mlp.{r}_proj.weight" for r in ("gate", "up", "down")}
HF_ROUTER = f"{_L}.block_sparse_moe.gate.weight"
HF_EXPERT = {
    r: f"{_L}.block_sparse_moe.experts.{{expert}}.{w}.weight"
    for r, w in (("gate", "w1"), ("up", "w3"), ("down", "w2"))
}

# --- mcore names (local spec) ---------------------------------------------------------------
_M = "decoder.layers.{layer}"
_MX = f"{_M}.mlp.experts.local_experts.{{expert}}"


@dataclass(frozen=True)
class Rule:
    """One mcore tensor built from ``hf`` tensors by ``transform``. ``scope`` says where it
    exists: model (once, first), layer (every layer), dense (dense layers), moe (MoE layers),
    expert (per expert), final (once, last)."""

    scope: str
    mcore: str
    hf: tuple[str, ...]
    transform: str = "copy"


RULES: tuple[Rule, ...] = (
    Rule("model", "embedding.word_embeddings.weight", (HF_EMBED,)),
    Rule("layer", f"{_M}.input_layernorm.weight", (HF_INPUT_NORM,)),
    Rule("layer", f"{_M}.self_attention.linear_qkv.weight", (HF_Q, HF_K, HF_V), "qkv"),
    Rule("layer", f"{_M}.self_attention.linear_proj.weight", (HF_O,)),
    Rule("layer", f"{_M}.pre_mlp_layernorm.weight", (HF_POST_ATTN_NORM,)),
    Rule("dense", f"{_M}.mlp.linear_fc1.weight", (HF_DENSE_MLP["gate"], HF_DENSE_MLP["up"]),
         "gate_up"),
    Rule("dense", f"{_M}.mlp.linear_fc2.weight", (HF_DENSE_MLP["down"],)),
    Rule("moe", f"{_M}.mlp.router.weight", (HF_ROUTER,)),
    Rule("expert", f"{_MX}.linear_fc1.weight", (HF_EXPERT["gate"], HF_EXPERT["up"]), "gate_up"),
    Rule("expert", f"{_MX}.linear_fc2.weight", (HF_EXPERT["down"],)),
    Rule("final", "decoder.final_layernorm.weight", (HF_FINAL_NORM,)),
    Rule("final", "output_layer.weight", (HF_LM_HEAD,)),
)


def expand_rules(arch: Arch) -> Iterator[tuple[str, tuple[str, ...], str]]:
    """(mcore name, HF names, transform) for every tensor of ``arch``, in model order."""
    by_scope: dict[str, list[Rule]] = {}
    for rule in RULES:
        by_scope.setdefault(rule.scope, []).append(rule)

    def fill(rule: Rule, **kw: int) -> tuple[str, tuple[str, ...], str]:
        return rule.mcore.format(**kw), tuple(h.format(**kw) for h in rule.hf), rule.transform

    for rule in by_scope["model"]:
        yield fill(rule)
    for layer in range(arch.num_layers):
        for rule in by_scope["layer"]:
            yield fill(rule, layer=layer)
        if not arch.is_moe(layer):
            for rule in by_scope["dense"]:
                yield fill(rule, layer=layer)
            continue
        for rule in by_scope["moe"]:
            yield fill(rule, layer=layer)
        for expert in range(arch.num_experts):
            for rule in by_scope["expert"]:
                yield fill(rule, layer=layer, expert=expert)
    for rule in by_scope["final"]:
        yield fill(rule)


def _hf_shape(template_name: str, arch: Arch) -> tuple[int, ...]:
    """Expected shape of one HF tensor, from the role its (filled) name plays."""
    h, f, d = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    suffix_shapes = {
        "embed_tokens.weight": (arch.vocab_size, h),
        "lm_head.weight": (arch.vocab_size, h),
        "layernorm.weight": (h,),
        "norm.weight": (h,),
        "q_proj.weight": (arch.num_heads * d, h),
        "k_proj.weight": (arch.num_kv_heads * d, h),
        "v_proj.weight": (arch.num_kv_heads * d, h),
        "o_proj.weight": (h, arch.num_heads * d),
        "block_sparse_moe.gate.weight": (arch.num_experts, h),
        "gate_proj.weight": (f, h),
        "up_proj.weight": (f, h),
        "w1.weight": (f, h),
        "w3.weight": (f, h),
        "down_proj.weight": (h, f),
        "w2.weight": (h, f),
    }
    for suffix, shape in suffix_shapes.items():
        if template_name.endswith(suffix):
            return shape
    raise ConversionError(f"no shape rule for {template_name}")


def hf_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of ``arch`` -> shape, in model order (the order files are written)."""
    return {h: _hf_shape(h, arch) for _, hf, _ in expand_rules(arch) for h in hf}


def _mcore_shape(hf_names: tuple[str, ...], transform: str, arch: Arch) -> tuple[int, ...]:
    parts = [_hf_shape(h, arch) for h in hf_names]
    if transform == "copy":
        return parts[0]
    return (sum(p[0] for p in parts), parts[0][1])  # qkv and gate_up stack rows


def mcore_shapes(arch: Arch, padded_vocab_size: int | None = None) -> dict[str, tuple[int, ...]]:
    """Every mcore tensor name of ``arch`` -> shape, in model order."""
    out = {m: _mcore_shape(hf, t, arch) for m, hf, t in expand_rules(arch)}
    if padded_vocab_size is not None:
        for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            out[name] = (padded_vocab_size, arch.hidden_size)
    return out


def check_key_set(keys: Iterable[str], expected: Iterable[str], what: str) -> None:
    """Raise naming the first missing/unexpected key (mcore ``*._extra_state`` is ignored)."""
    have = {k for k in keys if not k.endswith("._extra_state")}
    want = set(expected)
    missing, extra = sorted(want - have), sorted(have - want)
    if missing:
        raise ConversionError(f"{what}: missing key {missing[0]} ({len(missing)} missing)")
    if extra:
        raise ConversionError(f"{what}: unexpected key {extra[0]} ({len(extra)} unexpected)")


def fetch(get: Getter, name: str, shape: tuple[int, ...], what: str = "checkpoint") -> Tensor:
    """``get(name)`` with the strict checks every conversion applies."""
    try:
        tensor = get(name)
    except KeyError:
        raise ConversionError(f"{what}: missing key {name}") from None
    if not isinstance(tensor, Tensor):
        raise ConversionError(f"{what}: {name} is not a tensor ({type(tensor).__name__})")
    if tuple(tensor.shape) != tuple(shape):
        raise ConversionError(
            f"{what}: {name} has shape {list(tensor.shape)}, expected {list(shape)}"
        )
    return tensor


# --- transforms -----------------------------------------------------------------------------
def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, arch: Arch) -> Tensor:
    """HF q/k/v -> mcore linear_qkv: per query group g, its q heads, then its k head, then its v."""
    g, d, h = arch.num_kv_heads, arch.head_dim, arch.hidden_size
    q_GQH = q.reshape(g, (arch.num_heads // g) * d, h)
    return torch.cat([q_GQH, k.reshape(g, d, h), v.reshape(g, d, h)], dim=1).reshape(-1, h)


def split_qkv(qkv: Tensor, arch: Arch) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of ``fuse_qkv``."""
    g, d, h = arch.num_kv_heads, arch.head_dim, arch.hidden_size
    per_group = (arch.num_heads // g) * d
    q, k, v = qkv.reshape(g, per_group + 2 * d, h).split([per_group, d, d], dim=1)
    return tuple(t.reshape(-1, h).contiguous() for t in (q, k, v))  # type: ignore[return-value]


def _resize_vocab(t: Tensor, rows: int) -> Tensor:
    if t.shape[0] >= rows:
        return t[:rows].contiguous()
    # Padded rows are zeros: megatron pads the vocabulary for divisibility only.
    return torch.cat([t, t.new_zeros(rows - t.shape[0], t.shape[1])])


_VOCAB_MCORE = ("embedding.word_embeddings.weight", "output_layer.weight")


def hf_to_mcore(
    get: Getter,
    arch: Arch,
    keys: Iterable[str] | None = None,
    padded_vocab_size: int | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """Stream HF (Llama/Mixtral/mixed) tensors as mcore tensors, in model order.

    ``keys``: the source's full key set, checked up front when given (otherwise only missing keys
    can be detected). ``padded_vocab_size``: zero-pad embedding/output rows to this size.
    """
    shapes = hf_shapes(arch)
    if keys is not None:
        check_key_set(keys, shapes, "HF checkpoint")
    for mcore_name, hf_names, transform in expand_rules(arch):
        parts = [fetch(get, h, shapes[h], "HF checkpoint") for h in hf_names]
        if transform == "qkv":
            out = fuse_qkv(*parts, arch)
        elif transform == "gate_up":
            out = torch.cat(parts, dim=0)
        else:
            out = parts[0]
        if padded_vocab_size is not None and mcore_name in _VOCAB_MCORE:
            out = _resize_vocab(out, padded_vocab_size)
        yield mcore_name, out


def mcore_to_hf(
    get: Getter,
    arch: Arch,
    keys: Iterable[str] | None = None,
    padded_vocab_size: int | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """Stream mcore tensors as HF tensors (Llama names for dense layers, Mixtral for MoE layers).

    ``padded_vocab_size``: the mcore embedding/output rows; they are cut back to ``vocab_size``.
    """
    shapes = mcore_shapes(arch, padded_vocab_size)
    if keys is not None:
        check_key_set(keys, shapes, "mcore checkpoint")
    for mcore_name, hf_names, transform in expand_rules(arch):
        t = fetch(get, mcore_name, shapes[mcore_name], "mcore checkpoint")
        if transform == "qkv":
            yield from zip(hf_names, split_qkv(t, arch), strict=True)
        elif transform == "gate_up":
            gate, up = t.chunk(2, dim=0)
            yield hf_names[0], gate.contiguous()
            yield hf_names[1], up.contiguous()
        elif mcore_name in _VOCAB_MCORE and padded_vocab_size is not None:
            yield hf_names[0], _resize_vocab(t, arch.vocab_size)
        else:
            yield hf_names[0], t


class StreamGetter:
    """A getter over a (name, tensor) stream: pulls until the name appears, buffering the rest.

    Each tensor is handed out once (then dropped), so when the consumer asks in roughly the order
    the stream produces, the buffer stays small. Lets one streaming conversion feed another.
    """

    def __init__(self, stream: Iterable[tuple[str, Tensor]]) -> None:
        self._stream = iter(stream)
        self._buffer: dict[str, Tensor] = {}

    def __call__(self, name: str) -> Tensor:
        if name in self._buffer:
            return self._buffer.pop(name)
        for key, tensor in self._stream:
            if key == name:
                return tensor
            self._buffer[key] = tensor
        raise KeyError(name)

    @property
    def buffered(self) -> int:
        return len(self._buffer)


# --- config.json ----------------------------------------------------------------------------
def _require(config: dict[str, Any], key: str) -> Any:
    if key not in config or config[key] is None:
        raise ConversionError(f"config.json: missing field {key}")
    return config[key]


def arch_from_hf_config(config: dict[str, Any]) -> Arch:
    """Arch of a Llama (dense) or Mixtral (MoE) config.json; other models or features raise."""
    model_type = config.get("model_type")
    if model_type not in ("llama", "mixtral"):
        raise ConversionError(f"config.json: model_type {model_type!r} is not llama or mixtral")
    if config.get("tie_word_embeddings", False):
        raise ConversionError("config.json: tied word embeddings are not supported (need lm_head)")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag, False):
            raise ConversionError(f"config.json: {flag} = true is not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"config.json: hidden_act {config['hidden_act']!r} is not silu")
    layers = int(_require(config, "num_hidden_layers"))
    hidden = int(_require(config, "hidden_size"))
    heads = int(_require(config, "num_attention_heads"))
    experts = int(_require(config, "num_local_experts")) if model_type == "mixtral" else 0
    dense_layers = set(config.get(MLP_ONLY_LAYERS_FIELD) or ())
    return Arch(
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        ffn_hidden_size=int(_require(config, "intermediate_size")),
        vocab_size=int(_require(config, "vocab_size")),
        num_experts=experts,
        moe_layers=frozenset(set(range(layers)) - dense_layers) if experts else frozenset(),
    )


def hf_settings_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """The non-shape settings ``hf_config_for`` takes, read from an existing config.json."""
    rope = config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default" or config.get("rope_scaling"):
        raise ConversionError(f"config.json: RoPE scaling ({rope_type}) is not supported")
    out = {
        "rms_norm_eps": config.get("rms_norm_eps", 1e-5),
        "rope_theta": rope.get("rope_theta", config.get("rope_theta", 10000.0)),
        "max_position_embeddings": config.get("max_position_embeddings", 4096),
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.get(key) is not None:
            out[key] = config[key]
    return out


def hf_config_for(
    arch: Arch,
    *,
    top_k: int = 2,
    rms_norm_eps: float = 1e-5,
    rope_theta: float = 10000.0,
    max_position_embeddings: int = 4096,
    router_aux_loss_coef: float = 0.02,
    dtype: str = "bfloat16",
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> dict[str, Any]:
    """config.json content: LlamaForCausalLM when dense, MixtralForCausalLM otherwise."""
    moe = arch.num_experts > 0
    config: dict[str, Any] = {
        "architectures": ["MixtralForCausalLM" if moe else "LlamaForCausalLM"],
        "model_type": "mixtral" if moe else "llama",
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "vocab_size": arch.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": rms_norm_eps,
        "max_position_embeddings": max_position_embeddings,
        # transformers 5 reads rope_parameters; older readers (and vLLM) read rope_theta.
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "dtype": dtype,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if moe:
        config.update(
            num_local_experts=arch.num_experts,
            num_experts_per_tok=top_k,
            router_aux_loss_coef=router_aux_loss_coef,
            output_router_logits=False,
            router_jitter_noise=0.0,
            sliding_window=None,
        )
        dense_layers = sorted(set(range(arch.num_layers)) - arch.moe_layers)
        if dense_layers:
            config[MLP_ONLY_LAYERS_FIELD] = dense_layers
    else:
        config["mlp_bias"] = False
    for key, value in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id),
                       ("pad_token_id", pad_token_id)):
        if value is not None:
            config[key] = value
    return config
