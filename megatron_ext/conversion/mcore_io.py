"""Read and write our megatron-core checkpoints (``checkpoint.store``) tensor by tensor.

Both directions speak the mcore names of ``keymaps`` (local spec, SequentialMLP experts
``local_experts.{e}``), so ``keymaps.hf_to_mcore`` / ``mcore_to_hf`` streams plug straight in.

Writing (``write_mcore_checkpoint``) runs in ONE process: gloo world of 1, TP = PP = EP = 1, our
model built from the config, every parameter filled exactly once from the stream, then saved with
``store.save`` (step 0, no optimizer). dist_checkpointing reshards on load, so a training run can
start from it at any expert-parallel size. Peak memory: one model copy in the stream's dtype
(bf16 sources build a bf16 model; norms stay fp32), plus one streamed tensor, plus whatever
dist_checkpointing stages while writing.

Reading (``read_mcore_checkpoint``) loads the checkpoint at EP = 1 (``load_model`` reshards
whatever layout it was saved with) and serves its state dict by name: one fp32 model copy.

Next to ``iter_*/`` and ``latest`` a converted root holds ``config.yaml`` (a complete training
config) and ``hf/`` (the HF config.json it came from plus tokenizer files), which lets the
reverse conversion restore token ids, dtype and tokenizer.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import Tensor

from megatron_ext.checkpoint.manifest import CheckpointError
from megatron_ext.config.derived import moe_layer_pattern
from megatron_ext.config.loader import ConfigError, apply_overrides, to_dict
from megatron_ext.config.schema import Config, DataConfig
from megatron_ext.config.validate import validate
from megatron_ext.conversion.hf_config import check_hf_config, read_hf_config
from megatron_ext.conversion.hf_io import TOKENIZER_FILES, staged_dir
from megatron_ext.conversion.keymaps import (
    MLP_ONLY_LAYERS_FIELD,
    Arch,
    ConversionError,
    arch_from_hf_config,
    check_key_set,
    expand_rules,
    hf_config_for,
    hf_settings_from_config,
    mcore_shapes,
    split_qkv,
)
from megatron_ext.platform.fs import HF_RECORD  # subdirectory: source config.json + tokenizer files
from megatron_ext.platform.quiet import quiet_process

TRAIN_CONFIG = "config.yaml"
VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")
Getter = Callable[[str], Tensor]


# --- configs ----------------------------------------------------------------------------------
def with_arch(cfg: Config, arch: Arch, top_k: int | None = None,
              aux_loss_coeff: float | None = None) -> Config:
    """Copy of ``cfg`` whose model/moe shape fields describe ``arch`` (other settings kept)."""
    if arch.head_dim * arch.num_heads != arch.hidden_size:
        # Our builder derives kv_channels = hidden / heads (no separate head_dim setting).
        raise ConversionError(f"head_dim {arch.head_dim} x {arch.num_heads} heads != hidden "
                              f"{arch.hidden_size}: not supported by our model builder")
    out = copy.deepcopy(cfg)
    m = out.model
    m.num_layers, m.hidden_size, m.num_attention_heads = (
        arch.num_layers, arch.hidden_size, arch.num_heads)
    m.num_kv_heads = arch.num_kv_heads
    m.ffn_hidden_size, m.vocab_size = arch.ffn_hidden_size, arch.vocab_size
    out.moe.num_experts = arch.num_experts
    if arch.num_experts:
        pattern = [int(arch.is_moe(i)) for i in range(arch.num_layers)]
        out.moe.layer_freq = 1 if all(pattern) else pattern
        out.moe.top_k = out.moe.top_k if top_k is None else top_k
        if aux_loss_coeff is not None:
            out.moe.aux_loss_coeff = aux_loss_coeff
    else:
        out.moe.layer_freq = 1
    return out


def config_from_hf(hf_config: dict[str, Any], overrides: Mapping[str, Any] | None = None,
                   data: DataConfig | None = None) -> Config:
    """Our Config for an HF Llama / Mixtral / mixed config.json; the rest are our defaults.
    ``overrides``: dotted keys (``"train.seed": 1``), type-checked. ``data``: the data section
    of the run that will train from it (the converters' ``--config``); without one the data
    section is unset (no mock data, no datasets), so training from it refuses with one line
    until the user names data: never random tokens unannounced."""
    hf_config = check_hf_config(hf_config)
    arch = arch_from_hf_config(hf_config)
    settings = hf_settings_from_config(hf_config)
    window = hf_config.get("sliding_window")
    if window is not None and int(window) < int(settings["max_position_embeddings"]):
        raise ConversionError(f"config.json: sliding_window {window} is not supported "
                              "(our attention is full causal)")
    theta = float(settings["rope_theta"])
    if theta != int(theta):
        raise ConversionError(f"config.json: rope_theta {theta} is not an integer "
                              "(megatron's GPTModel takes an integer rotary_base)")
    cfg = with_arch(Config(), arch, top_k=hf_config.get("num_experts_per_tok"),
                    aux_loss_coeff=hf_config.get("router_aux_loss_coef"))
    max_pos = int(settings["max_position_embeddings"])
    cfg.model.max_position_embeddings = max_pos
    cfg.model.rotary_base = theta
    cfg.model.norm_epsilon = float(settings["rms_norm_eps"])
    cfg.data = copy.deepcopy(data) if data is not None else DataConfig(mock=False)
    if data is None:
        cfg.data.seq_length = min(cfg.data.seq_length, max_pos)
    return apply_overrides(cfg, overrides or {})  # re-checks every field's type


def arch_from_config(cfg: Config) -> Arch:
    m = cfg.model
    pattern = moe_layer_pattern(cfg.model, cfg.moe)
    return Arch(
        num_layers=m.num_layers, hidden_size=m.hidden_size, num_heads=m.num_attention_heads,
        num_kv_heads=m.num_kv_heads or m.num_attention_heads,
        head_dim=m.hidden_size // m.num_attention_heads, ffn_hidden_size=m.ffn_hidden_size,
        vocab_size=m.vocab_size, num_experts=cfg.moe.num_experts,
        moe_layers=frozenset(i for i, moe in enumerate(pattern) if moe),
    )


def hf_record(path: str | Path, arch: Arch) -> Path | None:
    """The ``hf/`` record of a converted checkpoint (``path``: its root or an ``iter_*`` dir),
    when it describes ``arch``; None otherwise (e.g. a training run's own checkpoints)."""
    path = Path(path)
    for root in (path, path.parent):
        config = root / HF_RECORD / "config.json"
        if config.is_file():
            try:
                if arch_from_hf_config(read_hf_config(config)) == arch:
                    return root / HF_RECORD
            except ConversionError:  # not usable: the checkpoint's own config describes it
                pass
    return None


def hf_config_from_mcore(cfg: Config, arch: Arch, dtype: torch.dtype,
                         record: Path | None = None) -> dict[str, Any]:
    """config.json for a model with ``cfg``'s settings; token ids come from the ``hf/`` record."""
    settings: dict[str, Any] = {
        "rms_norm_eps": cfg.model.norm_epsilon, "rope_theta": cfg.model.rotary_base,
        "max_position_embeddings": cfg.model.max_position_embeddings}
    if record is not None:
        source = hf_settings_from_config(read_hf_config(record))
        settings.update({k: v for k, v in source.items() if k.endswith("_token_id")})
    config = hf_config_for(arch, top_k=cfg.moe.top_k, router_aux_loss_coef=cfg.moe.aux_loss_coeff,
                           dtype=str(dtype).removeprefix("torch."), **settings)
    return config


# --- process group ----------------------------------------------------------------------------
@contextmanager
def single_process(cfg: Config | None) -> Iterator[None]:
    """A world of one with TP = PP = EP = 1 (``cfg``; None: the body initializes it, e.g. via
    ``load_model``), torn down on exit so the next step can set up its own."""
    # why inside: platform.dist imports megatron-core (seconds); only mcore checkpoints need it
    from megatron_ext.platform.dist import init_distributed, shutdown

    if dist.is_initialized():
        # Reusing a caller's groups would silently build a sharded model.
        raise ConversionError("torch.distributed is already initialized in this process; "
                              "run conversions in a process of their own")
    # init_distributed picks a free MASTER_PORT into os.environ: put the caller's back, so that
    # nothing started from this process later (a job, a tool) inherits a port it never chose
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    try:
        if cfg is not None:
            one = copy.deepcopy(cfg)
            one.parallel.tensor = one.parallel.pipeline = one.parallel.expert = 1
            one.parallel.world_size = 1
            init_distributed(one)
        yield
    finally:
        shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --- writing ----------------------------------------------------------------------------------
def _precision(dtype: torch.dtype) -> str:
    # bf16 weights are kept as bf16 (half the memory); anything else is held exactly in fp32.
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def _fill(model: torch.nn.Module, stream: Iterable[tuple[str, Tensor]], vocab_size: int) -> None:
    """Copy every streamed tensor into its parameter; each parameter exactly once."""
    # why inside: model.experts imports megatron-core (seconds); HF-only callers never need it
    from megatron_ext.model.experts import grouped_to_sequential_state

    # Grouped experts hold [E, ...] parameters: their per-expert slices are views, so copying
    # into the SequentialMLP-named slices fills the real parameters.
    params = {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()
              if not k.endswith("._extra_state")}
    targets = grouped_to_sequential_state(params)
    filled: set[str] = set()
    for name, tensor in stream:
        if name not in targets:
            raise ConversionError(f"mcore stream: unexpected tensor {name}")
        if name in filled:
            raise ConversionError(f"mcore stream: tensor {name} given twice")
        dst = targets[name]
        if tuple(tensor.shape) == tuple(dst.shape):
            rows = dst
        elif name in VOCAB_TENSORS and tuple(tensor.shape) == (vocab_size, dst.shape[1]):
            rows = dst[:vocab_size]
            dst[vocab_size:].zero_()  # padding rows: never a real token
        else:
            raise ConversionError(f"mcore stream: {name} has shape {list(tensor.shape)}, the "
                                  f"model has {list(dst.shape)}")
        rows.copy_(tensor)
        if tensor.dtype != rows.dtype and not torch.equal(rows.to(tensor.dtype), tensor):
            # The model was built in the dtype of the first tensor; a wider one would be
            # rounded silently.
            raise ConversionError(f"mcore stream: {name} ({tensor.dtype}) does not fit the "
                                  f"{rows.dtype} model exactly; convert it to one dtype first")
        filled.add(name)
    missing = sorted(set(targets) - filled)
    if missing:
        raise ConversionError(f"mcore stream: missing tensor {missing[0]} ({len(missing)} missing)")


def save_mcore_into(out_dir: Path, stream: Iterable[tuple[str, Tensor]], cfg: Config,
                    dtype: torch.dtype = torch.float32, hf_config: dict[str, Any] | None = None,
                    tokenizer_dir: Path | None = None) -> None:
    """Write a checkpoint root into the existing empty ``out_dir`` (staging is the caller's):
    ``iter_0000000/``, ``latest``, ``config.yaml`` and, given ``hf_config``, ``hf/``."""
    quiet_process(all_from_internals=True)  # a bad input is one stderr line
    # why inside: both import megatron-core (seconds); HF-only callers never need it
    from megatron_ext.checkpoint import store as ckpt
    from megatron_ext.model.builder import build_model, resolve_backends

    build_cfg = copy.deepcopy(cfg)
    build_cfg.parallel.tensor = build_cfg.parallel.pipeline = build_cfg.parallel.expert = 1
    build_cfg.parallel.world_size = None
    build_cfg.train.precision = _precision(dtype)
    d = build_cfg.data
    if not (d.mock or d.demo_corpus or d.blend):  # data unset (config_from_hf): training
        d.mock = True  # refuses it; building the model needs none
    try:
        validate(build_cfg, world_size=1)
    except ConfigError as e:
        raise ConversionError(f"config: {e}") from None
    with single_process(build_cfg):
        model = build_model(build_cfg, resolve_backends(build_cfg, cuda=False))
        with torch.no_grad():
            _fill(model, stream, cfg.model.vocab_size)
        layout = {"world_size": 1, "tensor": 1, "pipeline": 1, "expert": 1,
                  "distributed_optimizer": False}
        try:
            ckpt.save(out_dir, ckpt.TrainState(), model, None, to_dict(cfg), layout,
                      keep_last=1, fully_reshardable=True)
        except ckpt.CheckpointError as e:  # non-finite weights in the source
            raise ConversionError(str(e)) from None
        del model
    (out_dir / TRAIN_CONFIG).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if hf_config is not None:
        record = out_dir / HF_RECORD
        record.mkdir()
        (record / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if tokenizer_dir is not None:
            for fname in (*TOKENIZER_FILES, "generation_config.json"):
                if (Path(tokenizer_dir) / fname).is_file():
                    shutil.copy2(Path(tokenizer_dir) / fname, record / fname)


def write_mcore_checkpoint(stream: Iterable[tuple[str, Tensor]], cfg: Config,
                           output_root: str | Path, overwrite: bool = False, *,
                           dtype: torch.dtype = torch.float32,
                           hf_config: dict[str, Any] | None = None,
                           tokenizer_dir: Path | None = None) -> Path:
    """``save_mcore_into`` a staged directory renamed to ``output_root`` on success (a failure
    leaves nothing there). ``dtype``: the stream's (the model is built in it, see the module
    docstring); ``stream`` may hold the padded or the tokenizer-sized vocabulary."""
    output_root = Path(output_root).absolute()
    with staged_dir(output_root, overwrite) as tmp:
        save_mcore_into(tmp, stream, cfg, dtype=dtype, hf_config=hf_config,
                        tokenizer_dir=tokenizer_dir)
    return output_root


# --- reading ----------------------------------------------------------------------------------
def read_mcore_checkpoint(path: str | Path, dtype: torch.dtype | None = None
                          ) -> tuple[Getter, list[str], Arch, Config]:
    """(getter, mcore keys, Arch, Config) of our checkpoint at ``path`` (root or iter dir).

    Keys are SequentialMLP-style, without ``_extra_state``; vocabulary padding rows are cut to
    ``cfg.model.vocab_size``. Tensors are fp32 (CPU) unless ``dtype`` is given.
    """
    quiet_process(all_from_internals=True)  # a bad input is one stderr line
    # why inside: both import megatron-core (seconds); HF-only callers never need it
    from megatron_ext.checkpoint.load_model import checkpoint_config, load_model
    from megatron_ext.model.experts import grouped_to_sequential_state

    try:  # bad paths and damaged files fail here, before any process group exists
        verified = checkpoint_config(path)
    except (CheckpointError, ConfigError, yaml.YAMLError, OSError) as e:
        raise ConversionError(" ".join(str(e).split())) from None
    ckpt_dir, cfg = verified.path, verified.config
    arch = arch_from_config(cfg)
    with single_process(None):
        try:  # verified above; verified again (and refused: one line, exit 2) only if a file
            # changed since
            _, model = load_model(verified, expert_parallel=1)
        except CheckpointError as e:
            raise ConversionError(" ".join(str(e).split())) from None
        state = {k: v.detach() for k, v in model.state_dict().items()
                 if not k.endswith("._extra_state")}
        del model
    state = grouped_to_sequential_state(state)
    check_key_set(state, mcore_shapes(arch), f"mcore checkpoint {ckpt_dir}")

    def get(name: str) -> Tensor:
        t = state[name]
        if name in VOCAB_TENSORS:
            t = t[: arch.vocab_size]
        return t if dtype is None else t.to(dtype)

    return get, list(state), arch, cfg


def hf_view(get: Getter, arch: Arch) -> Getter:
    """Random-access HF-name getter over an mcore getter (unpadded vocab): each HF tensor is
    computed when asked for, so nothing beyond the mcore tensors stays in memory."""
    index: dict[str, tuple[str, str, int]] = {}
    for mcore_name, hf_names, transform in expand_rules(arch):
        for i, hf_name in enumerate(hf_names):
            index[hf_name] = (mcore_name, transform, i)

    def hf_get(name: str) -> Tensor:
        mcore_name, transform, i = index[name]  # KeyError for unknown names, like a dict
        t = get(mcore_name)
        if transform == "qkv":
            return split_qkv(t, arch)[i]
        if transform == "gate_up":
            return t.chunk(2, dim=0)[i].contiguous()
        return t

    return hf_get


def is_mixed(arch: Arch) -> bool:
    """MoE with some dense layers: HF config.json carries ``mlp_only_layers``."""
    return arch.num_experts > 0 and len(arch.moe_layers) < arch.num_layers


MIXED_NOTE = (f"mixed dense/MoE model: config.json lists the dense layers in "
              f"'{MLP_ONLY_LAYERS_FIELD}'; stock MixtralForCausalLM (transformers, vLLM) cannot "
              "load it (use megatron_ext.conversion.hf_models.load_moe)")
