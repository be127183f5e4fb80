"""Every place where we wrap, replace or override megatron-core internals, and the start-up check.

megatron-core is pinned (``TESTED_VERSIONS``); these patches reach into names it does not
promise to keep. Each record says what we change, where, megatron-core's own equivalent (if
any) and when the patch can go. ``check()`` (call it once at start-up) refuses an untested
megatron-core version and verifies that every patched name still exists upstream, in one line
naming the version and the patches; it imports megatron-core modules but builds nothing.

This module is in the platform layer: it names our modules and megatron's by dotted strings
only, never importing model/checkpoint/training. tests/unit/test_patches.py walks the sources
of megatron_ext and fails on a patch site that has no record here.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

from megatron_ext.errors import UserError

# megatron-core versions these patches were written and tested against (pyproject pins it).
TESTED_VERSIONS = ("0.16.1",)


@dataclass(frozen=True)
class Patch:
    name: str
    module: str
    """Our module that applies it."""
    targets: tuple[str, ...]
    """megatron-core names we replace, wrap or override (or read to decide whether to): each
    must exist upstream."""
    upstream: str
    """megatron-core's own equivalent ("" when there is none)."""
    remove_when: str
    adds: tuple[str, ...] = ()
    """Names we set that megatron-core does not define (markers, a missing optional name);
    only their owner must exist."""


_TP_RANDOM = "megatron.core.tensor_parallel.random"
_DCP_TORCH = "megatron.core.dist_checkpointing.strategies.torch"
_DCP_COMMON = "megatron.core.dist_checkpointing.strategies.common.TorchCommonLoadStrategy"

PATCHES: tuple[Patch, ...] = (
    Patch(
        "cpu-rng", "megatron_ext.platform.cpu",
        targets=(f"{_TP_RANDOM}._get_cuda_rng_state", f"{_TP_RANDOM}._set_cuda_rng_state"),
        upstream="",
        remove_when="megatron-core runs on CPU (it has no CPU path in 0.16.1); the torch.cuda "
                    "redirections in the same module go with it",
    ),
    Patch(
        "te-general-gemm", "megatron_ext.platform.compat",
        targets=("megatron.core.transformer.moe.moe_utils.HAVE_TE",),
        adds=("megatron.core.transformer.moe.moe_utils.te_general_gemm",),
        upstream="megatron.core.extensions.transformer_engine.te_general_gemm (with TE)",
        remove_when="moe_utils defines te_general_gemm (as None) without Transformer Engine",
    ),
    Patch(
        "checkpoint-fp8-default", "megatron_ext.platform.compat",
        targets=(f"{_TP_RANDOM}.CheckpointWithoutOutput.__init__", f"{_TP_RANDOM}.HAVE_TE"),
        adds=(f"{_TP_RANDOM}.CheckpointWithoutOutput._fp8_default_fixed",),
        upstream="",
        remove_when="CheckpointWithoutOutput(fp8=False) means no FP8 without Transformer Engine",
    ),
    Patch(
        "fused-rope", "megatron_ext.model.rope",
        targets=("megatron.core.models.common.embeddings.rope_utils.fused_apply_rotary_pos_emb",),
        upstream="Transformer Engine's fused_apply_rotary_pos_emb (apply_rope_fusion with TE)",
        remove_when="megatron-core ships a fused RoPE without Transformer Engine, or every "
                    "image has Transformer Engine",
    ),
    Patch(
        "local-dispatcher", "megatron_ext.model.dispatcher",
        targets=("megatron.core.transformer.moe.moe_layer.MoELayer.token_dispatcher",),
        upstream="megatron.core.transformer.moe.token_dispatcher.MoEAllGatherTokenDispatcher",
        remove_when="megatron's dispatchers keep per-expert counts on the device (no "
                    "tokens_per_expert.cpu() sync per MoE layer)",
    ),
    Patch(
        "grouped-experts", "megatron_ext.model.experts",
        targets=("megatron.core.transformer.moe.moe_layer.MoESubmodules.experts",),
        upstream="megatron's SequentialMLP (local spec) or TEGroupedMLP (Transformer Engine)",
        remove_when="megatron-core has a grouped-GEMM expert MLP without Transformer Engine, "
                    "checkpoint-compatible with SequentialMLP",
    ),
    Patch(
        "all-layers-router", "megatron_ext.model.experts",
        # the router's class (model.load_balancing.AllLayersRouter overrides TopKRouter.routing
        # and attaches its loss with MoEAuxLossAutoScaler)
        targets=("megatron.core.transformer.moe.moe_layer.MoESubmodules.router",
                 "megatron.core.transformer.moe.router.TopKRouter.routing",
                 "megatron.core.transformer.moe.moe_utils.MoEAuxLossAutoScaler"),
        upstream="moe_router_load_balancing_type aux_loss (per layer; moe.aux_loss_scope: "
                 "per_layer); global_aux_loss pools one layer over data-parallel ranks",
        remove_when="megatron-core offers one load-balancing loss over the routing of all "
                    "layers (transformers' load_balancing_loss_func)",
    ),
    Patch(
        "lazy-jit-fuser", "megatron_ext.platform.mcore_import",
        # torch.compile is a stand-in while megatron.core's own import runs, so
        # megatron.core.jit.jit_fuser keeps it; nothing of megatron's is assigned (no targets),
        # and if upstream renames jit_fuser the hook only loses its saving
        targets=(),
        upstream="megatron.core.jit.disable_jit_fuser (no compilation at all)",
        remove_when="megatron-core defers torch.compile (and its torch._dynamo import) to a "
                    "fusion's first call",
    ),
    Patch(
        "megatron-without-loggers", "megatron_ext.platform.mcore_import",
        # megatron.core.timers (wandb, SummaryWriter) and inference.contexts.dynamic_context
        # (HAVE_WANDB) see neither logger (their ImportError fallbacks); we use neither the
        # timers' writers nor megatron's inference engine
        targets=(),
        upstream="",
        remove_when="megatron-core imports wandb and tensorboard where it logs, not at import",
    ),
    Patch(
        "fused-lm-loss", "megatron_ext.model.lm_loss",
        targets=("megatron.core.models.gpt.GPTModel._postprocess",),
        upstream="GPTModel's output_layer + tensor_parallel.vocab_parallel_cross_entropy "
                 "(model.lm_loss: megatron)",
        remove_when="megatron-core computes the output layer and cross-entropy in chunks "
                    "without fp32 [tokens, vocab] logits",
    ),
    Patch(
        "moe-globals-reset", "megatron_ext.model.builder",
        targets=("megatron.core.transformer.moe.moe_utils.MoEAuxLossAutoScaler"
                 ".main_loss_backward_scale",
                 "megatron.core.transformer.moe.moe_utils.get_moe_layer_wise_logging_tracker"),
        upstream="megatron.core.transformer.moe.moe_utils.clear_aux_losses_tracker (zeroes the "
                 "tracker's values but keeps their size)",
        remove_when="megatron-core keeps MoE logging and aux-loss scale state per model, not "
                    "per process",
    ),
    Patch(
        "step-cuda-graph", "megatron_ext.training.cuda_graph",
        targets=(),
        upstream="megatron.core.full_cuda_graph.FullCudaGraphWrapper (wraps "
                 "forward_backward_func; class-level graph state, one model per process)",
        remove_when="FullCudaGraphWrapper can graph our step as it is called (our static "
                    "inputs, eager optimizer step, skipped non-finite steps)",
    ),
    Patch(
        "chunked-index-writes", "megatron_ext.data.indexed_writer",
        targets=("megatron.core.datasets.indexed_dataset._IndexWriter._sequence_pointers",),
        upstream="megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder (add_document "
                 "per document; finalize loops over numpy scalars)",
        remove_when="IndexedDatasetBuilder adds many documents in one call and computes the "
                    "sequence pointers vectorized",
    ),
    Patch(
        "restricted-checkpoint-reads", "megatron_ext.checkpoint.safe_pickle",
        targets=(f"{_DCP_TORCH}._get_filesystem_reader", f"{_DCP_TORCH}.FileSystemReader",
                 f"{_DCP_TORCH}.CachedMetadataFileSystemReader",
                 f"{_DCP_TORCH}.MCoreLoadPlanner.load_bytes",
                 f"{_DCP_COMMON}.load_common", f"{_DCP_COMMON}.load_sharded_objects"),
        adds=(f"{_DCP_TORCH}._megatron_ext_restricted",),
        upstream="",
        remove_when="megatron-core's dist-checkpoint readers unpickle with an allow-list "
                    "(torch weights_only) everywhere",
    ),
    Patch(
        "sync-save-results-in-process", "megatron_ext.checkpoint.writer_queue",
        targets=("megatron.core.dist_checkpointing.strategies.filesystem_async._results_queue",
                 "megatron.core.dist_checkpointing.strategies.filesystem_async"
                 "._get_write_results_queue"),
        upstream="",
        remove_when="megatron-core's synchronous save keeps its write results in the saving "
                    "process (0.16.1 sends them through a spawned Manager, whose server "
                    "imports torch to unpickle them)",
    ),
)


class UnsupportedMegatron(UserError):
    """The installed megatron-core is not one our patches were written for (exit 2)."""


def installed_version() -> str:
    import megatron.core  # why inside: seconds to import; callers that only read records skip it

    return str(megatron.core.__version__)


def _resolve(dotted: str) -> Any:
    """The object a dotted name denotes: the longest importable module prefix, then getattr."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def exists(dotted: str) -> bool:
    """Whether megatron-core still defines ``dotted``. A class's instance attribute counts when
    the class's ``__init__`` assigns it (e.g. ``MoELayer.token_dispatcher``)."""
    try:
        _resolve(dotted)
        return True
    except (ImportError, AttributeError):
        pass
    owner_name, _, attr = dotted.rpartition(".")
    try:
        owner = _resolve(owner_name)
    except (ImportError, AttributeError):
        return False
    init = getattr(owner, "__init__", None) if inspect.isclass(owner) else None
    return attr in getattr(getattr(init, "__code__", None), "co_names", ())


def missing(patches: tuple[Patch, ...] = PATCHES) -> list[str]:
    """'name (patch)' for each target, and each added name's owner, not found upstream."""
    gone = [f"{name} ({p.name})" for p in patches for name in p.targets if not exists(name)]
    owners = {(name.rpartition(".")[0], p.name) for p in patches for name in p.adds}
    return gone + [f"{owner} ({patch})" for owner, patch in sorted(owners)
                   if not exists(owner)]


def check(version: str | None = None, patches: tuple[Patch, ...] = PATCHES) -> None:
    """Refuse (``UnsupportedMegatron``, one line) an untested megatron-core ``version`` (default:
    the installed one) or a patched name that no longer exists upstream."""
    version = installed_version() if version is None else version
    names = ", ".join(p.name for p in patches)
    if version not in TESTED_VERSIONS:
        raise UnsupportedMegatron(
            f"megatron-core {version} is installed, but megatron_ext's patches of its internals "
            f"({names}) were tested with {', '.join(TESTED_VERSIONS)} only: install "
            f"megatron-core=={TESTED_VERSIONS[-1]} or review megatron_ext/platform/patches.py")
    gone = missing(patches)
    if gone:
        raise UnsupportedMegatron(
            f"megatron-core {version}: patched names no longer exist upstream: "
            f"{', '.join(gone)}; review megatron_ext/platform/patches.py")
