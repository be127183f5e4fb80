"""Config -> megatron-core GPTModel with MoE layers, and the backend choices made on the way.

Backends (chosen here, logged by the caller via ``Backends.describe()``):
- Transformer Engine layer spec when ``transformer_engine`` imports on a CUDA machine;
- otherwise megatron's local spec with our core attention (flash-attn or torch SDPA) swapped in,
  and our grouped-GEMM experts in place of the SequentialMLP loop when ``moe.grouped_gemm``.
Also chosen here: the loss head (``FusedLossGPTModel`` or megatron's), the token dispatcher
(our ``local`` one without EP/TP), torch.compile'd fusions (SwiGLU, RMSNorm, RoPE, loss), and
the load-balancing loss (megatron's per layer, or ``model.load_balancing``'s over all layers).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    get_moe_layer_wise_logging_tracker,
)
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_ext.config.derived import Derived, derive
from megatron_ext.config.loader import ConfigError
from megatron_ext.config.schema import Config, ModelConfig, MoEConfig, ParallelConfig, TrainConfig
from megatron_ext.model import load_balancing, rope
from megatron_ext.model.attention import HAVE_FLASH_ATTN, FlashAttention, SDPAttention
from megatron_ext.model.dispatcher import use_local_dispatcher
from megatron_ext.model.experts import use_grouped_experts, use_router
from megatron_ext.model.lm_loss import FusedLossGPTModel
from megatron_ext.model.load_balancing import AllLayersRouter
from megatron_ext.model.norm import RMSNorm
from megatron_ext.platform.quiet import quiet_megatron


@dataclass
class Backends:
    precision: str  # "bf16" | "fp32"
    spec: str  # "te" | "local"
    attention: str  # "te" | "flash" | "sdpa" | "unfused"
    experts: str  # "te-grouped" | "grouped" | "sequential" | "none"
    dispatcher: str  # "alltoall" | "allgather" | "local" | "none"
    lm_loss: str = "megatron"  # "fused" | "megatron"
    fusion: bool = False  # torch.compile'd elementwise fusions

    def describe(self) -> str:
        return (f"precision={self.precision} spec={self.spec} attention={self.attention} "
                f"experts={self.experts} dispatcher={self.dispatcher} lm_loss={self.lm_loss} "
                f"fusion={'on' if self.fusion else 'off'}")


def have_te() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_backends(cfg: Config, cuda: bool | None = None) -> Backends:
    """The backends for ``cfg`` (the root config: its model, moe, parallel and train sections
    all decide one)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
    want = cfg.model.attention_backend
    if want == "te" and not (cuda and have_te()):
        raise ConfigError("model.attention_backend: te needs CUDA and transformer_engine")
    if want == "flash" and not (cuda and HAVE_FLASH_ATTN):
        raise ConfigError("model.attention_backend: flash needs CUDA and the flash_attn package")
    if want == "auto":
        want = "te" if cuda and have_te() else ("flash" if cuda and HAVE_FLASH_ATTN else "sdpa")
    spec = "te" if want == "te" else "local"
    moe = cfg.moe.num_experts > 0
    if not moe:
        experts = "none"
    elif spec == "te":
        experts = "te-grouped" if cfg.moe.grouped_gemm else "sequential"
    else:
        experts = "grouped" if cfg.moe.grouped_gemm else "sequential"
    dispatcher = cfg.moe.token_dispatcher
    if dispatcher == "auto":
        # Without expert or tensor parallelism nothing is exchanged: our sync-free local
        # permutation (dropless only). Otherwise alltoall sends less than allgather, but gloo
        # (CPU) has no all-to-all with splits.
        if cfg.parallel.expert * cfg.parallel.tensor == 1 and cfg.moe.capacity_factor is None:
            dispatcher = "local"
        else:
            dispatcher = "alltoall" if cuda else "allgather"
    fusion = cuda if cfg.model.kernel_fusion is None else cfg.model.kernel_fusion
    return Backends(precision, spec, want, experts, dispatcher if moe else "none",
                    cfg.model.lm_loss, fusion)


def transformer_config(m: ModelConfig, moe: MoEConfig, par: ParallelConfig, tr: TrainConfig,
                       moe_layers: Sequence[int], backends: Backends) -> TransformerConfig:
    """megatron-core's config of the model; ``moe_layers``: the run's ``moe_layer_pattern``."""
    bf16 = backends.precision == "bf16"
    kwargs = dict(
        num_layers=m.num_layers, hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_kv_heads or m.num_attention_heads,
        ffn_hidden_size=m.ffn_hidden_size, kv_channels=m.hidden_size // m.num_attention_heads,
        normalization="RMSNorm", layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=m.init_method_std,
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        tensor_model_parallel_size=par.tensor, pipeline_model_parallel_size=par.pipeline,
        # Pipeline stages: chunks per stage (interleaved schedule), an uneven first/last stage,
        # and the dtype and fixed shapes of the activations sent between stages.
        virtual_pipeline_model_parallel_size=(
            par.virtual_pipeline if par.pipeline > 1 and (par.virtual_pipeline or 1) > 1
            else None),
        num_layers_in_first_pipeline_stage=par.first_stage_layers if par.pipeline > 1 else None,
        num_layers_in_last_pipeline_stage=par.last_stage_layers if par.pipeline > 1 else None,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32, variable_seq_lengths=False,
        # gloo matches point-to-point messages between two ranks in posting order: with two
        # stages, batched ops swap the activations and gradients that both go to the same peer
        # (same shapes: silently wrong). megatron's unbatched ops use a second group for one
        # direction. On GPU, megatron's default (batched NCCL ops).
        batch_p2p_comm=torch.cuda.is_available(),
        expert_model_parallel_size=par.expert, sequence_parallel=par.sequence_parallel,
        # Init on the host keeps weights identical across TP/EP layouts for one seed (not across
        # pipeline layouts: a stage draws only its own layers), and is the only option on CPU;
        # on GPU megatron initializes on the device (faster, per-rank RNG).
        use_cpu_initialization=not torch.cuda.is_available(),
        # SwiGLU through megatron's torch.compile'd bias_swiglu (dense MLPs and our experts).
        bias_activation_fusion=backends.fusion,
        bias_dropout_fusion=False, masked_softmax_fusion=False,
        # TE's fused RoPE when installed, else ours (compiled) in megatron's slot for it.
        apply_rope_fusion=backends.fusion and rope.install(),
        gradient_accumulation_fusion=False, persist_layer_norm=False,
        deterministic_mode=tr.deterministic and not torch.cuda.is_available(),
        cross_entropy_loss_fusion=False,
    )
    if tr.recompute != "none":
        kwargs["recompute_granularity"] = tr.recompute
        if tr.recompute == "full":
            kwargs.update(recompute_method="uniform", recompute_num_layers=1)
        else:
            kwargs["recompute_modules"] = list(tr.recompute_modules)
    if moe.num_experts > 0:
        kwargs.update(
            num_moe_experts=moe.num_experts, moe_router_topk=moe.top_k,
            # Softmax over the top-k is Mixtral's gate; for k=1 it would be constant 1 with no
            # gradient to the router, so top-1 uses Switch's softmax over all experts.
            moe_router_pre_softmax=moe.top_k == 1,
            # all_layers: megatron's per-layer loss off; ours (model.load_balancing) instead.
            moe_aux_loss_coeff=0.0 if all_layers_aux(moe) else moe.aux_loss_coeff,
            moe_router_load_balancing_type="none" if all_layers_aux(moe) else "aux_loss",
            moe_z_loss_coeff=moe.z_loss_coeff, moe_router_dtype="fp32",
            # "local" replaces the allgather dispatcher after the build (build_model).
            moe_token_dispatcher_type=(
                "allgather" if backends.dispatcher == "local" else backends.dispatcher),
            # megatron reads this flag when building its spec (whose experts our grouped ones
            # then replace) and requires it for moe_act recompute, which ours implement too.
            moe_grouped_gemm=backends.experts == "te-grouped" or (
                backends.experts == "grouped" and "moe_act" in kwargs.get("recompute_modules", [])),
            moe_layer_freq=list(moe_layers),
            moe_expert_capacity_factor=moe.capacity_factor,
            moe_token_drop_policy=moe.token_drop_policy,
            moe_pad_expert_input_to_capacity=moe.pad_to_capacity,
            moe_ffn_hidden_size=m.ffn_hidden_size,
        )
    return TransformerConfig(**kwargs)


def all_layers_aux(moe: MoEConfig) -> bool:
    """Whether the model carries the paper stack's load-balancing loss over all MoE layers."""
    return moe.num_experts > 0 and moe.aux_loss_scope == "all_layers" and moe.aux_loss_coeff > 0


def layer_index(module: torch.nn.Module) -> int:
    """The 0-based transformer layer index of a layer or of a module in one (a router, an MoE
    layer): the one numbering of metrics (``moe/layer{L}/...``), routing heatmaps, reports,
    ``moe.layer_freq`` lists, ``moe-upcycle --moe-layers`` and HF's ``model.layers.{L}``.
    megatron-core's ``layer_number`` counts from 1 (global across pipeline stages)."""
    return int(module.layer_number) - 1


def layer_specs(config: TransformerConfig, backends: Backends, vp_stage: int | None = None,
                all_layers: bool = False):
    """The layer specs of this rank's pipeline stage (chunk ``vp_stage`` when interleaved);
    ``all_layers``: MoE routers that report to the all-layers load-balancing loss."""
    # With moe_grouped_gemm (set for moe_act recompute) and no TE, megatron picks and warns
    # about its legacy GroupedMLP; our grouped experts replace it below.
    with quiet_megatron():
        block = get_gpt_decoder_block_spec(
            config, use_transformer_engine=backends.spec == "te", normalization="RMSNorm",
            vp_stage=vp_stage,
        )
    if all_layers:
        block = use_router(block, AllLayersRouter)
    if backends.spec == "te":
        return block
    core = {"sdpa": SDPAttention, "flash": FlashAttention, "unfused": DotProductAttention}[
        backends.attention
    ]
    # megatron's torch-norm fallback refuses sequence parallelism (needed for MoE + TP).
    norm = ModuleSpec(module=RMSNorm, params={"fused": backends.fusion})
    for spec in block.layer_specs:
        spec.submodules.self_attention.submodules.core_attention = core
        spec.submodules.input_layernorm = norm
        spec.submodules.pre_mlp_layernorm = norm
    block.layer_norm = norm
    if backends.experts == "grouped":
        block = use_grouped_experts(block)
    return block


def _reset_moe_globals() -> None:
    """A new model starts megatron's process-global MoE state afresh. Its aux-loss tracker is
    sized by the first model's layer count and never resized (a deeper second model in the same
    process indexed past its end), and the aux-loss gradient scale keeps the shape and value of
    whichever backward set it first (0-d outside the schedule, [1] inside it: the schedule's
    copy_ into a 0-d scale fails)."""
    get_moe_layer_wise_logging_tracker().clear()
    MoEAuxLossAutoScaler.main_loss_backward_scale = None


def build_model(cfg: Config, backends: Backends) -> GPTModel:
    """Build this rank's GPTModel (parallel state must be initialized): the whole model, or its
    pipeline stage; for tools that build a model outside a training run (a run builds its chunks
    from the values it derived once: ``build_model_chunks``)."""
    chunks = build_model_chunks(cfg, backends, derive(cfg))
    if len(chunks) != 1:
        raise ConfigError("parallel.virtual_pipeline: this tool needs one model chunk per rank "
                          "(set parallel.virtual_pipeline: null)")
    return chunks[0]


def build_model_chunks(cfg: Config, backends: Backends, derived: Derived) -> list[GPTModel]:
    """This rank's model chunks (parallel state must be initialized): one per virtual pipeline
    stage, in order. Each holds its own layers, numbered globally (megatron's layer offset), so
    checkpoints and metrics name a layer the same way at any pipeline layout; the first chunk
    of the first stage holds the embedding, the last chunk of the last stage the LM head.
    Reads the model, moe, parallel and train sections of ``cfg``, and ``derived``'s MoE layer
    pattern and padded vocabulary."""
    _reset_moe_globals()
    m, moe = cfg.model, cfg.moe
    config = transformer_config(m, moe, cfg.parallel, cfg.train, derived.moe_layer_pattern,
                                backends)  # one config: the schedule reads chunk 0's
    vpp = config.virtual_pipeline_model_parallel_size
    model_class = FusedLossGPTModel if backends.lm_loss == "fused" else GPTModel
    chunks = []
    for vp_stage in range(vpp) if vpp else [None]:
        model = model_class(
            config=config,
            transformer_layer_spec=layer_specs(config, backends, vp_stage, all_layers_aux(moe)),
            vocab_size=derived.padded_vocab,
            max_sequence_length=m.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                               vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                               vp_stage=vp_stage),
            position_embedding_type="rope",
            rotary_base=int(m.rotary_base),
            share_embeddings_and_output_weights=False,
            vp_stage=vp_stage,
        )
        model.fuse_kernels = backends.fusion
        load_balancing.install(model, moe.aux_loss_coeff)
        if backends.dispatcher == "local":
            use_local_dispatcher(model)
        chunks.append(model)
    return chunks
