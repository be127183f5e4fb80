"""Grouped-GEMM MoE experts: a drop-in replacement for megatron-core's ``SequentialMLP``.

``GroupedGemmExperts`` runs all local experts of a MoE layer in one
``torch.nn.functional.grouped_mm`` per projection (fc1, fc2) instead of a Python loop over
experts. It keeps ``SequentialMLP``'s math, its forward contract and its distributed-checkpoint
layout, so checkpoints move freely between the two (and across expert-parallel sizes).

Weight layout: ``fc1_weight`` [E, G, H] and ``fc2_weight`` [E, H, F], i.e. [expert, out, in].
 * ``fc1_weight[e]`` is bit-for-bit ``SequentialMLP``'s ``local_experts.e.linear_fc1.weight``
   (same [out, in] convention, same [gate; up] halves under expert-TP), so state-dict
   conversion is a stack/unbind and the checkpoint shards are views (no transpose copy, unlike
   megatron's legacy ``GroupedMLP`` which stores [in, out]).
 * ``grouped_mm`` gets ``weight.transpose(-2, -1)``: a column-major (K-contiguous) right operand,
   the layout torch's grouped GEMM kernels are written around (the FP8 variants require it).
 * one stacked parameter per projection: no per-step ``torch.stack`` of per-expert weights, and
   the optimizer sees two large tensors instead of 2E small ones.

Supported: gated (``gated_linear_unit``; SwiGLU with silu, GeGLU, ...) and plain activations,
``moe_apply_probs_on_input``, ``bias_activation_fusion`` (SwiGLU), ``moe_act`` recompute,
expert-parallel and expert-tensor-parallel shards. Not supported (raise): expert biases,
FP8/FP4, ``moe_latent_size``; flattened (distributed-optimizer legacy) checkpoint formats.

Loading: ``load_state_dict`` accepts both this module's keys and ``SequentialMLP``-style keys
(``local_experts.{e}.linear_fc{1,2}.weight``; see ``_load_from_state_dict``). For whole-model
dicts use ``sequential_to_grouped_state`` / ``grouped_to_sequential_state``.

Shape legend (suffixes on tensor names):
  T  tokens routed to this rank's local experts, sorted by expert
  E  local experts (num_moe_experts / expert_model_parallel_size)
  H  hidden size
  F  expert ffn size on this expert-TP rank (moe_ffn_hidden_size / expert_tensor_parallel_size)
  G  fc1 output width on this rank: 2F with a gated linear unit ([gate; up]), else F
  K, N  contraction / output width of a generic grouped linear
"""

from __future__ import annotations

import copy
import dataclasses
import re
from functools import cached_property, partial
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedStateDict, ShardedTensorFactory
from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
from megatron.core.tensor_parallel.layers import (
    _initialize_affine_weight_cpu,
    _initialize_affine_weight_gpu,
    set_tensor_model_parallel_attributes,
)
from megatron.core.tensor_parallel.utils import divide
from megatron.core.transformer.mlp import MLPSubmodules, apply_swiglu_sharded_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_object_for_checkpoint,
)
from megatron.core.utils import get_pg_rank, get_pg_size, make_tp_sharded_tensor_for_checkpoint

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)

# dtypes torch's grouped_mm accepts per device (torch 2.13). On CUDA only bf16 has the fast
# CUTLASS kernel; anything else goes through a fallback that copies offsets to the host.
_GROUPED_MM_DTYPES = {
    "cuda": (torch.bfloat16,),
    "cpu": (torch.float32, torch.bfloat16, torch.float16),
}
BACKENDS = ("auto", "grouped_mm", "loop")
# (state-dict parameter name, SequentialMLP linear name)
_PARAMS = (("fc1_weight", "linear_fc1"), ("fc2_weight", "linear_fc2"))


def grouped_mm_supported(x_TK: torch.Tensor, w_ENK: torch.Tensor) -> bool:
    """Whether ``grouped_mm(x_TK, w_ENK.mT)`` can run here (dtype, device, 16-byte alignment)."""
    if _grouped_mm is None or x_TK.dtype != w_ENK.dtype:
        return False
    if x_TK.dtype not in _GROUPED_MM_DTYPES.get(x_TK.device.type, ()):
        return False
    # The kernels need every non-unit stride (here K for both operands) and both base
    # pointers aligned to 16 bytes.
    nbytes = x_TK.element_size()
    return (
        x_TK.is_contiguous()
        and w_ENK.is_contiguous()
        and (x_TK.shape[-1] * nbytes) % 16 == 0
        and x_TK.data_ptr() % 16 == 0
        and w_ENK.data_ptr() % 16 == 0
    )


class _TokenGroups:
    """tokens_per_expert in the two forms the GEMM paths need, each computed at most once."""

    def __init__(self, tokens_per_expert: torch.Tensor, device: torch.device):
        self.tokens_per_expert = tokens_per_expert
        self.device = device

    @cached_property
    def offs_E(self) -> torch.Tensor:
        # cumsum on the compute device: no host sync (the CPU->GPU copy is a no-op when the
        # dispatcher already left the counts on the GPU).
        return torch.cumsum(self.tokens_per_expert.to(self.device), 0, dtype=torch.int32)

    @cached_property
    def splits(self) -> list[int]:
        return self.tokens_per_expert.tolist()  # host sync on GPU: loop fallback only


def grouped_linear(
    x_TK: torch.Tensor, w_ENK: torch.Tensor, groups: _TokenGroups, backend: str = "auto"
) -> torch.Tensor:
    """y_TN[rows of expert e] = x_TK[rows of expert e] @ w_ENK[e].T, for all experts."""
    if backend != "loop":
        x_TK = x_TK.contiguous()
        if grouped_mm_supported(x_TK, w_ENK):
            # Rows past offs[-1] would be left uninitialised: callers guarantee
            # sum(tokens_per_expert) == T (as SequentialMLP's torch.split does).
            return _grouped_mm(x_TK, w_ENK.transpose(-2, -1), offs=groups.offs_E)
        if backend == "grouped_mm":
            raise RuntimeError(
                f"grouped_mm unavailable for {x_TK.dtype} on {x_TK.device} "
                f"(K={x_TK.shape[-1]}, torch {torch.__version__})"
            )
    chunks_TK = torch.split(x_TK, groups.splits)
    return torch.cat([xe @ we.t() for xe, we in zip(chunks_TK, w_ENK.unbind(0))])


def _expert_key(key: str, global_expert: int, singleton: bool) -> str:
    """SequentialMLP's sharded key for one expert: '...experts.X' or '...experts.{g}.X'."""
    if not singleton:
        return key
    head, tail = key.rsplit("experts.", 1)
    return f"{head}experts.{global_expert}.{tail}"


@torch.no_grad()
def _merge_expert_shards(shards: list) -> torch.Tensor:
    # Inverse of GroupedGemmExperts._build_expert_shards: [gate, up] pairs are concatenated
    # (as MLP's swiglu factory does), then experts are stacked.
    return torch.stack([torch.cat(s) if isinstance(s, list) else s for s in shards])


class GroupedGemmExperts(MegatronModule):
    """All local experts of a MoE layer, computed with one grouped GEMM per projection.

    Constructor and forward follow ``SequentialMLP`` so a MoE layer spec can swap it in
    (see ``use_grouped_experts``); ``submodules`` is accepted for that and otherwise unused.
    ``backend``: "auto" (grouped_mm where supported, else loop), "grouped_mm" (raise if
    unsupported) or "loop" (per-expert matmuls; the reference path).
    """

    def __init__(
        self,
        num_local_experts: int,
        config: TransformerConfig,
        submodules: Optional[MLPSubmodules] = None,
        pg_collection: Optional[Any] = None,
        backend: str = "auto",
    ):
        super().__init__(config=config)
        if config.add_bias_linear:
            raise ValueError("GroupedGemmExperts has no expert biases: set add_bias_linear=False")
        if config.fp8 or config.fp4:
            raise ValueError("GroupedGemmExperts does not support fp8/fp4")
        if config.moe_latent_size is not None:
            raise ValueError("GroupedGemmExperts does not support moe_latent_size")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        pg_collection = pg_collection or get_default_pg_collection()
        self.num_local_experts = num_local_experts
        self.backend = backend
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp
        self.tp_rank, self.tp_size = get_pg_rank(self.tp_group), get_pg_size(self.tp_group)
        self.ep_rank, self.ep_size = get_pg_rank(self.ep_group), get_pg_size(self.ep_group)
        self.num_global_experts = num_local_experts * self.ep_size
        self.expert_offset = self.ep_rank * num_local_experts

        glu = config.gated_linear_unit
        hidden = config.hidden_size
        ffn_full = config.moe_ffn_hidden_size * (2 if glu else 1)
        ffn_local = divide(config.moe_ffn_hidden_size, self.tp_size)
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        make = partial(torch.empty, dtype=config.params_dtype, device=device)
        self.fc1_weight = torch.nn.Parameter(
            make(num_local_experts, divide(ffn_full, self.tp_size), hidden)
        )
        self.fc2_weight = torch.nn.Parameter(make(num_local_experts, hidden, ffn_local))
        # Same attributes SequentialMLP's linears carry: DDP/optimizer route params with
        # allreduce=False to the expert-data-parallel group; TP attrs drive grad-norm dedup.
        fc1_stride = 2 if glu else 1
        set_tensor_model_parallel_attributes(self.fc1_weight, True, 1, fc1_stride)
        set_tensor_model_parallel_attributes(self.fc2_weight, True, 2, 1)
        for param in (self.fc1_weight, self.fc2_weight):
            param.allreduce = not config.expert_model_parallel_size > 1
        if config.perform_initialization:
            self._init_weights(ffn_full, fc1_stride)

        self._fused_swiglu = (
            config.bias_activation_fusion and glu and config.activation_func is F.silu
        )
        self.activation_recompute = (
            config.recompute_granularity == "selective" and "moe_act" in config.recompute_modules
        )

    def _init_weights(self, ffn_full: int, fc1_stride: int) -> None:
        """Initialise expert by expert, fc1 then fc2, exactly like SequentialMLP does.

        Same helpers, same order: with the same seed both modules start bit-identical, both
        for CPU init (global RNG, full master weight split over expert-TP) and device init
        (expert-parallel RNG tracker).
        """
        cfg = self.config
        hidden, ffn = cfg.hidden_size, cfg.moe_ffn_hidden_size
        for e in range(self.num_local_experts):
            fc1_GH, fc2_HF = self.fc1_weight.data[e], self.fc2_weight.data[e]
            for w, init, out_size, in_size, dim, stride in (
                (fc1_GH, cfg.init_method, ffn_full, hidden, 0, fc1_stride),
                (fc2_HF, cfg.output_layer_init_method, hidden, ffn, 1, 1),
            ):
                if cfg.use_cpu_initialization:
                    _initialize_affine_weight_cpu(
                        w, out_size, in_size, w.shape[dim], dim, init, stride=stride,
                        params_dtype=cfg.params_dtype, rank=self.tp_rank,
                        world_size=self.tp_size, skip_set_tensor_parallel_attributes=True,
                    )  # fmt: skip
                else:
                    _initialize_affine_weight_gpu(w, init, dim, stride=stride, is_expert=True)

    def _activation(self, h_TG: torch.Tensor, probs_T1: torch.Tensor) -> torch.Tensor:
        """act(fc1) * router prob, mirroring MLP.forward's per_token_scale paths."""
        cfg = self.config
        if self._fused_swiglu:
            return weighted_bias_swiglu_impl(
                h_TG, None, probs_T1, cfg.activation_func_fp8_input_store
            )
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
        self,
        permuted_local_hidden_states: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        permuted_probs: torch.Tensor,
    ) -> tuple[torch.Tensor, None]:
        """Expert outputs for tokens sorted by local expert; same contract as SequentialMLP.

        ``tokens_per_expert`` [E] (CPU or device) must sum to the number of rows.
        """
        x_TH = permuted_local_hidden_states
        probs_T1 = permuted_probs.unsqueeze(-1)
        if self.config.moe_apply_probs_on_input:
            assert self.config.moe_router_topk == 1, "moe_apply_probs_on_input needs topk=1"
            x_TH = (probs_T1 * x_TH).to(x_TH.dtype)
            probs_T1 = torch.ones_like(probs_T1)
        groups = _TokenGroups(tokens_per_expert, x_TH.device)
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
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None
    ) -> ShardedStateDict:
        """Exactly SequentialMLP's sharded tensors/objects (keys, shapes, offsets, replicas).

        Each stacked parameter becomes one ShardedTensorFactory (so optimizer states map onto
        it too) whose build emits, per local expert, the tensors SequentialMLP's MLP would,
        using the same megatron helpers on views of the stacked weight.
        """
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        singleton = metadata.get("singleton_local_shards", False)
        dp_rank = get_pg_rank(self.dp_group)
        glu = self.config.gated_linear_unit
        sharded: ShardedStateDict = {}
        for (name, linear), tp_axis in zip(_PARAMS, (0, 1)):
            build = partial(
                self._build_expert_shards,
                tp_axis=tp_axis,
                glu=glu and name == "fc1_weight",
                singleton=singleton,
                sharded_offsets=sharded_offsets,
                dp_cp_group=metadata["dp_cp_group"],
            )
            sharded[f"{prefix}{name}"] = ShardedTensorFactory(
                f"{prefix}experts.{linear}.weight",
                getattr(self, name),
                build,
                _merge_expert_shards,
                (0, 0, dp_rank),  # SequentialMLP: replicated along expert-DP only
            )
        # SequentialMLP's linears also save an (empty) _extra_state per expert; emit the same
        # objects so a checkpoint written by this module loads into SequentialMLP. Their dict
        # keys are SequentialMLP's and are dropped again by _load_from_state_dict.
        for e in range(self.num_local_experts):
            g = self.expert_offset + e
            offsets = self._expert_offsets(sharded_offsets, g, singleton)
            for _, linear in _PARAMS:
                key = _expert_key(f"{prefix}experts.{linear}._extra_state", g, singleton)
                sharded[f"{prefix}local_experts.{e}.{linear}._extra_state"] = (
                    make_sharded_object_for_checkpoint(
                        None, key, offsets, replica_id=(0, self.tp_rank, dp_rank)
                    )
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
        """Also accept SequentialMLP keys (``local_experts.{e}.linear_fc{1,2}.weight``).

        Per-expert weights are stacked when all E of them are present; their (always empty)
        ``_extra_state`` entries are dropped. torch passes a copy of the caller's dict.
        """
        for name, linear in _PARAMS:
            keys = [
                f"{prefix}local_experts.{e}.{linear}.weight" for e in range(self.num_local_experts)
            ]
            if f"{prefix}{name}" not in state_dict and all(k in state_dict for k in keys):
                state_dict[f"{prefix}{name}"] = torch.stack([state_dict.pop(k) for k in keys])
        for key in [k for k in state_dict if k.startswith(f"{prefix}local_experts.")]:
            if key.endswith("._extra_state"):
                del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# ---- whole-model state-dict conversion ------------------------------------------------------

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
        m = _SEQUENTIAL_KEY.match(key)
        if m is None:
            out[key] = value
        elif m["leaf"] == "weight":
            per_expert.setdefault((m["head"], m["linear"]), {})[int(m["e"])] = value
    names = {linear: name for name, linear in _PARAMS}
    for (head, linear), by_expert in per_expert.items():
        if sorted(by_expert) != list(range(len(by_expert))):
            raise ValueError(f"{head}local_experts: experts {sorted(by_expert)} not contiguous")
        out[f"{head}{names[linear]}"] = torch.stack([by_expert[e] for e in range(len(by_expert))])
    return out


def grouped_to_sequential_state(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Model state dict with GroupedGemmExperts -> SequentialMLP keys (one entry per expert).

    Values are views of the stacked tensors; ``_extra_state`` entries are not needed
    (megatron's linears add them on load).
    """
    out: dict[str, Any] = {}
    linears = dict(_PARAMS)
    for key, value in state_dict.items():
        m = _GROUPED_KEY.match(key)
        if m is None:
            out[key] = value
            continue
        for e, w in enumerate(value.unbind(0)):
            out[f"{m['head']}local_experts.{e}.{linears[m['name']]}.weight"] = w
    return out


# ---- specs -----------------------------------------------------------------------------------


def grouped_experts_spec(backend: str = "auto") -> ModuleSpec:
    """ModuleSpec for ``MoESubmodules.experts``."""
    return ModuleSpec(
        module=GroupedGemmExperts,
        params={"backend": backend},
        submodules=MLPSubmodules(
            linear_fc1=tensor_parallel.ColumnParallelLinear,
            linear_fc2=tensor_parallel.RowParallelLinear,
        ),
    )


def use_grouped_experts(spec: Any, backend: str = "auto") -> Any:
    """Copy of a layer/block spec with every MoE layer's experts replaced by ours.

    Accepts a layer ModuleSpec (e.g. ``get_gpt_layer_local_spec(num_experts=...)``), a
    ``TransformerBlockSubmodules`` (``get_gpt_decoder_block_spec``: dense layers are left
    alone), or anything nesting them (lists, dataclasses). The input is not modified.
    """
    spec = copy.deepcopy(spec)
    _swap_experts(spec, grouped_experts_spec(backend))
    return spec


def _swap_experts(node: Any, experts: ModuleSpec) -> None:
    if isinstance(node, MoESubmodules):
        node.experts = experts
    elif isinstance(node, (list, tuple)):
        for child in node:
            _swap_experts(child, experts)
    elif dataclasses.is_dataclass(node) and not isinstance(node, type):
        for f in dataclasses.fields(node):
            _swap_experts(getattr(node, f.name), experts)
