"""Grouped-GEMM MoE experts: a drop-in replacement for megatron-core's ``SequentialMLP``.

``GroupedGemmExperts`` runs all local experts in one ``torch.nn.functional.grouped_mm`` per
projection instead of a Python loop, with ``SequentialMLP``'s math, forward contract and
distributed-checkpoint layout (checkpoints move freely between the two and across EP sizes).

Weights: ``fc1_weight`` [E, G, H] and ``fc2_weight`` [E, H, F], i.e. [expert, out, in]:
 * ``fc1_weight[e]`` is bit-for-bit SequentialMLP's ``local_experts.e.linear_fc1.weight``
   (same [out, in] convention and [gate; up] halves under expert-TP): state-dict conversion is
   a stack/unbind and checkpoint shards are views (legacy ``GroupedMLP`` stores [in, out] and
   must transpose-copy).
 * grouped_mm gets ``weight.transpose(-2, -1)``: a K-contiguous ("column-major") right operand,
   the layout torch's grouped kernels are built around (the FP8 variants require it).
 * one stacked parameter per projection: no per-step ``torch.stack`` of 2E small weights.

Supported: gated (SwiGLU, GeGLU, clamp/offset) and plain activations, moe_apply_probs_on_input,
bias_activation_fusion (SwiGLU), moe_act recompute (TransformerConfig only allows it with
moe_grouped_gemm=True, which has no other effect here), EP, expert-TP. Rejected: expert
biases, fp8/fp4, moe_latent_size, flattened (legacy dist-optimizer) checkpoint formats.
``load_state_dict`` also takes SequentialMLP keys (whole-model dicts: ``*_state`` helpers).

Shape legend: T tokens routed to the local experts (sorted by expert), E local experts,
H hidden, F expert ffn size per expert-TP rank, G fc1 width (2F gated, else F), K/N generic.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import warnings
from collections.abc import Mapping
from functools import cached_property, partial
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedStateDict, ShardedTensorFactory
from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import (
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu as _init_cpu
from megatron.core.tensor_parallel.layers import _initialize_affine_weight_gpu as _init_gpu
from megatron.core.tensor_parallel.utils import divide
from megatron.core.transformer.mlp import MLPSubmodules, apply_swiglu_sharded_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group as _with_dp_cp
from megatron.core.transformer.utils import make_sharded_object_for_checkpoint
from megatron.core.utils import get_pg_rank, get_pg_size, make_tp_sharded_tensor_for_checkpoint

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
# dtypes torch 2.13's grouped_mm takes per device. On CUDA only bf16 has the CUTLASS kernel;
# other dtypes hit a fallback that copies offsets to the host (a sync), so we loop instead.
_GROUPED_MM_DTYPES = {"cuda": (torch.bfloat16,), "cpu": (torch.float32, torch.bfloat16, torch.half)}
BACKENDS = ("auto", "grouped_mm", "loop")
_PARAMS = (("fc1_weight", "linear_fc1"), ("fc2_weight", "linear_fc2"))  # ours, SequentialMLP's


def grouped_mm_supported(x_TK: torch.Tensor, w_ENK: torch.Tensor) -> bool:
    """Whether ``grouped_mm(x_TK, w_ENK.mT)`` can run here (dtype, device, 16-byte alignment)."""
    if _grouped_mm is None or x_TK.dtype != w_ENK.dtype:
        return False
    if x_TK.dtype not in _GROUPED_MM_DTYPES.get(x_TK.device.type, ()):
        return False
    # Kernels need the non-unit stride (K for both operands) and, on CUDA, both base pointers
    # 16-byte aligned (megatron's DDP buffers only pad param starts with the dist optimizer).
    ok = x_TK.is_contiguous() and w_ENK.is_contiguous()
    ok = ok and x_TK.shape[-1] * x_TK.element_size() % 16 == 0
    if ok and x_TK.is_cuda and (x_TK.data_ptr() % 16 or w_ENK.data_ptr() % 16):
        # Say so (once: warnings' default filter); a silent fallback would hide a slowdown.
        warnings.warn("GroupedGemmExperts: unaligned weight/input, using the loop path",
                      stacklevel=2)
        return False
    return ok


class TokenGroups:
    """tokens_per_expert in the two forms the GEMM paths need, each computed at most once."""

    def __init__(self, tokens_per_expert: torch.Tensor, device: torch.device):
        self.tokens_per_expert, self.device = tokens_per_expert, device

    @cached_property
    def offs_E(self) -> torch.Tensor:
        # No host sync: cumsum runs where the counts are and a CPU->GPU copy is non-blocking
        # (pageable memory is staged by the driver at once, so this is safe).
        offs_E = torch.cumsum(self.tokens_per_expert, 0, dtype=torch.int32)
        return offs_E.to(self.device, non_blocking=True)

    @cached_property
    def splits(self) -> list[int]:
        return self.tokens_per_expert.tolist()  # host sync on GPU: loop fallback only


def grouped_linear(
    x_TK: torch.Tensor, w_ENK: torch.Tensor, groups: TokenGroups, backend: str = "auto"
) -> torch.Tensor:
    """y_TN[rows of expert e] = x_TK[rows of expert e] @ w_ENK[e].T, for all experts."""
    if x_TK.shape[0] == 0:  # no tokens: skip kernels, keep zero weight grads for DDP hooks
        return x_TK @ w_ENK.sum(0).t()
    if backend != "loop":
        x_TK = x_TK.contiguous()
        if grouped_mm_supported(x_TK, w_ENK):
            # Rows past offs[-1] would be left uninitialised: callers guarantee
            # sum(tokens_per_expert) == T (as SequentialMLP's torch.split does).
            return _grouped_mm(x_TK, w_ENK.transpose(-2, -1), offs=groups.offs_E)
        if backend == "grouped_mm":
            raise RuntimeError(f"grouped_mm unavailable: {x_TK.dtype} {x_TK.device} {x_TK.shape}")
    chunks_TK = torch.split(x_TK, groups.splits)
    return torch.cat([xe @ we.t() for xe, we in zip(chunks_TK, w_ENK.unbind(0), strict=True)])


def _expert_key(key: str, global_expert: int, singleton: bool) -> str:
    """SequentialMLP's sharded key for one expert: '...experts.X' or '...experts.{g}.X'."""
    head, tail = key.rsplit("experts.", 1)
    return f"{head}experts.{global_expert}.{tail}" if singleton else key


@torch.no_grad()
def _merge_expert_shards(shards: list) -> torch.Tensor:
    # Inverse of GroupedGemmExperts._build_expert_shards: [gate, up] pairs are concatenated
    # (as MLP's swiglu factory does), then experts are stacked.
    return torch.stack([torch.cat(s) if isinstance(s, list) else s for s in shards])


class GroupedGemmExperts(MegatronModule):
    """All local experts of a MoE layer, one grouped GEMM per projection.

    Constructor/forward follow ``SequentialMLP`` so a MoE layer spec can swap it in
    (``use_grouped_experts``); ``submodules`` is accepted for that and unused. ``backend``:
    "auto" (grouped_mm where supported, else loop), "grouped_mm" (raise if unsupported) or
    "loop" (per-expert matmuls, the reference path)."""

    def __init__(
        self,
        num_local_experts: int,
        config: TransformerConfig,
        submodules: MLPSubmodules | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        backend: str = "auto",
    ):
        super().__init__(config=config)
        for unsupported in ("add_bias_linear", "fp8", "fp4", "moe_latent_size"):
            if getattr(config, unsupported, None):
                raise ValueError(f"GroupedGemmExperts does not support {unsupported}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        pg_collection = pg_collection or get_default_pg_collection()
        self.num_local_experts, self.backend = num_local_experts, backend
        self.ep_group, self.tp_group = pg_collection.ep, pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp
        self.tp_rank, self.tp_size = get_pg_rank(self.tp_group), get_pg_size(self.tp_group)
        self.ep_rank, self.ep_size = get_pg_rank(self.ep_group), get_pg_size(self.ep_group)
        self.num_global_experts = num_local_experts * self.ep_size
        self.expert_offset = self.ep_rank * num_local_experts

        glu, hidden = config.gated_linear_unit, config.hidden_size
        ffn_full = config.moe_ffn_hidden_size * (2 if glu else 1)
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        empty = partial(torch.empty, dtype=config.params_dtype, device=device)
        f_local = divide(config.moe_ffn_hidden_size, self.tp_size)
        g_local = 2 * f_local if glu else f_local
        self.fc1_weight = torch.nn.Parameter(empty(num_local_experts, g_local, hidden))
        self.fc2_weight = torch.nn.Parameter(empty(num_local_experts, hidden, f_local))
        # Same attributes SequentialMLP's linears carry: DDP/optimizer route params with
        # allreduce=False to the expert-data-parallel group; TP attrs drive grad-norm dedup.
        fc1_stride = 2 if glu else 1
        set_tensor_model_parallel_attributes(self.fc1_weight, True, 1, fc1_stride)
        set_tensor_model_parallel_attributes(self.fc2_weight, True, 2, 1)
        for param in (self.fc1_weight, self.fc2_weight):
            param.allreduce = not config.expert_model_parallel_size > 1
        if config.perform_initialization:
            self._init_weights(ffn_full, fc1_stride)

        fused = config.bias_activation_fusion and glu
        self._fused_swiglu = fused and config.activation_func is F.silu
        self.activation_recompute = (
            config.recompute_granularity == "selective" and "moe_act" in config.recompute_modules
        )

    def _init_weights(self, ffn_full: int, fc1_stride: int) -> None:
        """Expert by expert, fc1 then fc2, with megatron's helpers: SequentialMLP's order, so
        the same seed gives bit-identical weights (CPU init: global RNG, master weight split
        over expert-TP; device init: expert-parallel RNG tracker)."""
        cfg = self.config
        hidden, ffn = cfg.hidden_size, cfg.moe_ffn_hidden_size
        for e in range(self.num_local_experts):
            fc1_GH, fc2_HF = self.fc1_weight.data[e], self.fc2_weight.data[e]
            for w, init, out_size, in_size, dim, stride in (
                (fc1_GH, cfg.init_method, ffn_full, hidden, 0, fc1_stride),
                (fc2_HF, cfg.output_layer_init_method, hidden, ffn, 1, 1),
            ):
                if cfg.use_cpu_initialization:
                    _init_cpu(
                        w, out_size, in_size, w.shape[dim], dim, init, stride=stride,
                        params_dtype=cfg.params_dtype, rank=self.tp_rank,
                        world_size=self.tp_size, skip_set_tensor_parallel_attributes=True,
                    )  # fmt: skip
                else:
                    _init_gpu(w, init, dim, stride=stride, is_expert=True)

    def _activation(self, h_TG: torch.Tensor, probs_T1: torch.Tensor) -> torch.Tensor:
        """act(fc1) * router prob, mirroring MLP.forward's per_token_scale paths."""
        cfg = self.config
        if self._fused_swiglu:
            fp8_store = cfg.activation_func_fp8_input_store
            return weighted_bias_swiglu_impl(h_TG, None, probs_T1, fp8_store)
        if cfg.gated_linear_unit:
            gate_TF, up_TF = torch.chunk(h_TG, 2, dim=-1)
            if (clamp := cfg.activation_func_clamp_value) is not None:
                gate_TF = gate_TF.clamp(min=None, max=clamp)
                up_TF = up_TF.clamp(min=-clamp, max=clamp)
            a_TF = cfg.activation_func(gate_TF) * (up_TF + cfg.glu_linear_offset)
        else:
            a_TF = cfg.activation_func(h_TG)
        # probs are usually fp32: multiply in the promoted dtype, return the activation dtype.
        return (a_TF * probs_T1).to(a_TF.dtype)

    def forward(
        self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
        permuted_probs: torch.Tensor,
    ) -> tuple[torch.Tensor, None]:  # fmt: skip
        """SequentialMLP's contract: rows sorted by local expert; ``tokens_per_expert`` [E]
        (CPU or device) sums to the number of rows. Returns (output, None)."""
        x_TH = permuted_local_hidden_states
        probs_T1 = permuted_probs.unsqueeze(-1)
        if self.config.moe_apply_probs_on_input:
            assert self.config.moe_router_topk == 1, "moe_apply_probs_on_input needs topk=1"
            x_TH = (probs_T1 * x_TH).to(x_TH.dtype)
            probs_T1 = torch.ones_like(probs_T1)
        groups = TokenGroups(tokens_per_expert, x_TH.device)
        h_TG = grouped_linear(x_TH, self.fc1_weight, groups, self.backend)
        if self.activation_recompute:
            # fp8=None: megatron's default (False) takes a Transformer Engine code path.
            ckpt = tensor_parallel.CheckpointWithoutOutput(fp8=None)
            a_TF = ckpt.checkpoint(self._activation, h_TG, probs_T1)
            out_TH = grouped_linear(a_TF, self.fc2_weight, groups, self.backend)
            ckpt.discard_output_and_register_recompute(out_TH)
        else:
            a_TF = self._activation(h_TG, probs_T1)
            out_TH = grouped_linear(a_TF, self.fc2_weight, groups, self.backend)
        return out_TH, None

    def backward_dw(self) -> None:
        """Weight grads are computed in the regular backward (API parity with SequentialMLP)."""

    # ---- checkpointing -------------------------------------------------------------------

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> ShardedStateDict:
        """Exactly SequentialMLP's sharded tensors/objects (keys, shapes, offsets, replicas).

        Each stacked parameter is one ShardedTensorFactory (optimizer states map onto it too)
        whose build emits, per local expert, what SequentialMLP's MLP would, via the same
        megatron helpers applied to views of the stacked weight."""
        metadata = _with_dp_cp(metadata)
        singleton = metadata.get("singleton_local_shards", False)
        dp_rank = get_pg_rank(self.dp_group)
        glu = self.config.gated_linear_unit
        sharded: ShardedStateDict = {}
        for (name, linear), tp_axis in zip(_PARAMS, (0, 1), strict=True):
            build = partial(
                self._build_expert_shards, tp_axis=tp_axis, glu=glu and tp_axis == 0,
                singleton=singleton, sharded_offsets=sharded_offsets,
                dp_cp_group=metadata["dp_cp_group"],
            )  # fmt: skip
            # replica id as SequentialMLP's: replicated along expert-DP only
            sharded[f"{prefix}{name}"] = ShardedTensorFactory(
                f"{prefix}experts.{linear}.weight", getattr(self, name), build,
                _merge_expert_shards, (0, 0, dp_rank),
            )  # fmt: skip
        # SequentialMLP's linears also save an (empty) _extra_state per expert; emit the same
        # objects so a checkpoint written by this module loads into SequentialMLP. Their dict
        # keys are SequentialMLP's and are dropped again by _load_from_state_dict.
        for e in range(self.num_local_experts):
            g = self.expert_offset + e
            offsets = self._expert_offsets(sharded_offsets, g, singleton)
            for _, linear in _PARAMS:
                key = _expert_key(f"{prefix}experts.{linear}._extra_state", g, singleton)
                replica_id = (0, self.tp_rank, dp_rank)
                sharded[f"{prefix}local_experts.{e}.{linear}._extra_state"] = (
                    make_sharded_object_for_checkpoint(None, key, offsets, replica_id=replica_id)
                )
        return sharded

    def _expert_offsets(self, sharded_offsets: tuple, global_expert: int, singleton: bool):
        if singleton:  # one checkpoint key per expert, no expert axis
            return sharded_offsets
        return (*sharded_offsets, (len(sharded_offsets), global_expert, self.num_global_experts))

    @torch.no_grad()
    def _build_expert_shards(
        self, key, t_EXY, replica_id, flattened_range, *, tp_axis, glu, singleton,
        sharded_offsets, dp_cp_group,
    ) -> list:  # fmt: skip
        # key/t/replica_id come from the factory, possibly rewritten by the optimizer
        # (optimizer-state keys and tensors), so nothing here may capture the parameter.
        if flattened_range is not None:
            raise NotImplementedError("GroupedGemmExperts: flattened checkpoint formats")
        shards = []
        for e, t_XY in enumerate(t_EXY.unbind(0)):
            g = self.expert_offset + e
            offsets = self._expert_offsets(sharded_offsets, g, singleton)
            sh_ten = make_tp_sharded_tensor_for_checkpoint(
                t_XY, _expert_key(key, g, singleton), tp_axis, replica_id=replica_id,
                prepend_offsets=offsets, tp_group=self.tp_group, dp_cp_group=dp_cp_group,
            )  # fmt: skip
            if glu:  # [gate; up] halves sharded separately, exactly as MLP does
                sh_ten = apply_swiglu_sharded_factory(sh_ten, offsets, singleton).build()
            shards.append(sh_ten)
        return shards

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Also accept SequentialMLP keys (``local_experts.{e}.linear_fc{1,2}.weight``): stacked
        when all E are present; their (always empty) ``_extra_state`` entries are dropped.
        Editing the dict is safe: torch's load_state_dict works on a copy of the caller's."""
        experts = range(self.num_local_experts)
        for name, linear in _PARAMS:
            keys = [f"{prefix}local_experts.{e}.{linear}.weight" for e in experts]
            if f"{prefix}{name}" not in state_dict and all(k in state_dict for k in keys):
                state_dict[f"{prefix}{name}"] = torch.stack([state_dict.pop(k) for k in keys])
        stale = f"{prefix}local_experts."
        for key in [k for k in state_dict if k.startswith(stale) and k.endswith("_extra_state")]:
            del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# ---- whole-model state-dict conversion and specs ------------------------------------------

_SEQUENTIAL_KEY = re.compile(
    r"^(?P<head>(?:.*\.)?experts\.)local_experts\.(?P<e>\d+)\.(?P<linear>linear_fc[12])\."
    r"(?P<leaf>weight|_extra_state)$"
)
_GROUPED_KEY = re.compile(r"^(?P<head>(?:.*\.)?experts\.)(?P<name>fc[12]_weight)$")


def sequential_to_grouped_state(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Model state dict with SequentialMLP experts -> GroupedGemmExperts keys (stacked)."""
    out: dict[str, Any] = {}
    per_expert: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if (m := _SEQUENTIAL_KEY.match(key)) is None:
            out[key] = value
        elif m["leaf"] == "weight":  # _extra_state is always empty: dropped
            per_expert.setdefault((m["head"], m["linear"]), {})[int(m["e"])] = value
    names = {linear: name for name, linear in _PARAMS}
    for (head, linear), by_expert in per_expert.items():
        if sorted(by_expert) != list(range(len(by_expert))):
            raise ValueError(f"{head}local_experts: experts {sorted(by_expert)} not contiguous")
        out[f"{head}{names[linear]}"] = torch.stack([by_expert[e] for e in sorted(by_expert)])
    return out


def grouped_to_sequential_state(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Model state dict with GroupedGemmExperts -> SequentialMLP keys (views, one per expert;
    megatron's linears add their ``_extra_state`` on load)."""
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        if (m := _GROUPED_KEY.match(key)) is None:
            out[key] = value
            continue
        for e, w in enumerate(value.unbind(0)):
            out[f"{m['head']}local_experts.{e}.{dict(_PARAMS)[m['name']]}.weight"] = w
    return out


def grouped_experts_spec(backend: str = "auto") -> ModuleSpec:
    """ModuleSpec for ``MoESubmodules.experts``."""
    linears = MLPSubmodules(tensor_parallel.ColumnParallelLinear, None, RowParallelLinear)
    return ModuleSpec(module=GroupedGemmExperts, params={"backend": backend}, submodules=linears)


def use_grouped_experts(spec: Any, backend: str = "auto") -> Any:
    """Copy of a spec with every MoE layer's experts replaced by ``GroupedGemmExperts``.

    Takes a layer ModuleSpec (``get_gpt_layer_local_spec(num_experts=...)``), a
    ``TransformerBlockSubmodules`` (``get_gpt_decoder_block_spec``; dense layers stay as they
    are) or anything nesting them (lists, dataclasses). The input is not modified."""
    spec = copy.deepcopy(spec)
    _swap_moe(spec, experts=grouped_experts_spec(backend))
    return spec


def use_router(spec: Any, router: type) -> Any:
    """Copy of a spec (as ``use_grouped_experts`` takes) whose MoE layers build ``router``
    (e.g. ``load_balancing.AllLayersRouter``) instead of megatron's TopKRouter."""
    spec = copy.deepcopy(spec)
    _swap_moe(spec, router=router)
    return spec


def _swap_moe(node: Any, experts: ModuleSpec | None = None, router: type | None = None) -> None:
    if isinstance(node, MoESubmodules):
        if experts is not None:
            node.experts = copy.deepcopy(experts)
        if router is not None:
            node.router = router
    elif isinstance(node, (list, tuple)):
        for child in node:
            _swap_moe(child, experts, router)
    elif dataclasses.is_dataclass(node) and not isinstance(node, type):
        for f in dataclasses.fields(node):
            _swap_moe(getattr(node, f.name), experts, router)
