"""Training-step throughput of three stacks with identical shapes, one after another in one process.

Variants (``VARIANT_NOTES`` is what the reports print):
- ``ours``: megatron-core GPTModel from our builder: SDPA core attention, GroupedGemmExperts, the
  config's token dispatcher (auto = our sync-free local one on a single device), the fused LM
  loss, and torch.compile'd fusions on GPU.
- ``hf``: transformers' MixtralForCausalLM, SDPA attention, its default experts implementation.
- ``plain``: megatron-core's local spec as shipped: unfused DotProductAttention + SequentialMLP,
  megatron's output layer + vocab_parallel_cross_entropy, no compiled fusions, the alltoall
  dispatcher (allgather on CPU), eager steps.
``ours`` follows the config's ``train.cuda_graph`` (configs/8x152M.yaml: on): the forward and
backward replay one captured CUDA graph, as in the training loop.

A variant name may carry config overrides after ``+``, for ablations in the same process:
``ours+model.lm_loss=megatron``, ``ours+model.kernel_fusion=false``,
``ours+train.micro_batch_size=8`` (one micro-batch per step, whatever its size).

Every variant runs the same step on the same random batch: forward with the LM loss and the
router load-balancing loss (coefficient from the config), backward, global grad-norm clipping
(``optimizer.clip_grad``), and a ``torch.optim.AdamW`` step (fused on CUDA) over all parameters.
Parameters, gradients and optimizer state are all in the model dtype (bf16 on GPU, fp32 on CPU).
This is deliberately NOT our training loop's step (megatron DDP with an fp32 grad buffer and the
distributed optimizer with fp32 master weights): one optimizer for all three keeps the comparison
about the model code. Warm-up steps are excluded; each timed step is bracketed by device syncs.
"""

from __future__ import annotations

import copy
import functools
import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_ext.config.derived import padded_vocab
from megatron_ext.config.loader import load_config
from megatron_ext.config.schema import Config
from megatron_ext.config.validate import validate
from megatron_ext.model.params import flops_per_token
from megatron_ext.platform.launch import free_port

from . import report
from .activations import saved_activation_bytes

VARIANTS = ("ours", "hf", "plain")

VARIANT_NOTES = {
    "ours": "megatron-core GPTModel via megatron_ext builder: SDPA core attention, "
            "GroupedGemmExperts (torch grouped_mm), {dispatcher} dispatcher, lm_loss={lm_loss}, "
            "compiled fusions {fusion}, Float16Module wrapper when bf16",
    "hf": "transformers MixtralForCausalLM, attn_implementation=sdpa, "
          "experts_implementation={experts}, output_router_logits=True (aux loss in the loss)",
    "plain": "megatron-core local spec as shipped: unfused DotProductAttention (materialized "
             "scores) + SequentialMLP (per-expert loop), {dispatcher} dispatcher, megatron "
             "output layer + cross-entropy, no compiled fusions",
}
STEP_NOTE = ("forward (LM loss + router aux loss) + backward + grad-norm clip + torch AdamW step "
             "(fused on CUDA); params/grads/Adam state in the model dtype; no DDP, no "
             "distributed optimizer, no data loading")


@dataclass
class BenchOptions:
    config: str
    overrides: list[str] = field(default_factory=list)
    layers: int | None = None
    micro_batch: int = 4
    seq: int = 4096
    steps: int = 10
    warmup: int = 3
    dtype: str = "auto"  # auto | bf16 | fp32
    peak_tflops: float = 989.0
    variants: tuple[str, ...] = VARIANTS
    profile: bool = False
    profile_steps: int = 2
    profile_variants: tuple[str, ...] | None = None  # None: those without +overrides
    trace_max_mb: float = 15.0


@dataclass
class Workload:
    """A built model and how to get its training loss from a batch."""

    model: torch.nn.Module
    loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    info: dict[str, Any]


def split_variant(name: str) -> tuple[str, list[str]]:
    """'ours+a.b=1+c.d=2' -> ('ours', ['a.b=1', 'c.d=2'])."""
    base, *extra = name.split("+")
    if base not in VARIANTS or any("=" not in e for e in extra):
        raise ValueError(f"variant {name!r}: expected one of {','.join(VARIANTS)}, optionally "
                         "followed by +key=value overrides")
    return base, extra


def bench_config(opts: BenchOptions, extra: list[str] = ()) -> Config:
    """The config file + overrides (+ a variant's), reshaped for one process on one device."""
    precision = opts.dtype if opts.dtype != "auto" else (
        "bf16" if torch.cuda.is_available() else "fp32")
    shape = [
        f"data.seq_length={opts.seq}", f"train.micro_batch_size={opts.micro_batch}",
        f"train.global_batch_size={opts.micro_batch}", f"train.precision={precision}",
        # One device: no model or expert parallelism, whatever the cluster config says.
        "parallel.tensor=1", "parallel.pipeline=1", "parallel.expert=1",
        "parallel.world_size=1", "parallel.sequence_parallel=false",
    ]
    if opts.layers is not None:
        shape.append(f"model.num_layers={opts.layers}")
    cfg = load_config(opts.config, [*opts.overrides, *shape, *extra])
    cfg.train.global_batch_size = cfg.train.micro_batch_size  # one micro-batch per step
    cfg.model.max_position_embeddings = max(cfg.model.max_position_embeddings,
                                            cfg.data.seq_length)
    validate(cfg, world_size=1)
    return cfg


def variant_config(cfg: Config, variant: str) -> Config:
    out = copy.deepcopy(cfg)
    if variant == "ours":
        out.moe.grouped_gemm = True
        # The comparison is about SDPA; an explicit flash/te choice is respected.
        if out.model.attention_backend in ("auto", "unfused"):
            out.model.attention_backend = "sdpa"
    elif variant == "plain":
        out.moe.grouped_gemm = False
        out.model.attention_backend = "unfused"
        out.model.lm_loss = "megatron"
        out.model.kernel_fusion = False
        out.train.cuda_graph = False  # as shipped; its attention forks the RNG (no capture)
        if out.moe.token_dispatcher in ("auto", "local"):  # megatron's GPU default (gloo: none)
            out.moe.token_dispatcher = "alltoall" if torch.cuda.is_available() else "allgather"
    return out


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def model_dtype(cfg: Config) -> torch.dtype:
    return torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32


def make_batch(cfg: Config, dev: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens (same for every variant); labels are the next tokens."""
    gen = torch.Generator().manual_seed(seed)
    b, s = cfg.train.micro_batch_size, cfg.data.seq_length
    tokens = torch.randint(0, cfg.model.vocab_size, (b, s + 1), generator=gen)
    return {
        "tokens": tokens[:, :-1].contiguous().to(dev),
        "labels": tokens[:, 1:].contiguous().to(dev),
        "position_ids": torch.arange(s).unsqueeze(0).expand(b, s).contiguous().to(dev),
    }


def build_megatron(cfg: Config) -> Workload:
    """GPTModel through our builder (parallel state must exist), as the training setup does."""
    from megatron.core.transformer.module import Float16Module

    from megatron_ext.model.builder import build_model, resolve_backends
    from megatron_ext.platform.dist import seed_everything

    seed_everything(cfg.train.seed)
    backends = resolve_backends(cfg)
    model = build_model(cfg, backends)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if backends.precision == "bf16":
        model = Float16Module(model.config, model)

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # Per-token CE [b, s]; the router's aux loss reaches the gradients through megatron's
        # MoEAuxLossAutoScaler (scale 1 outside the pipeline schedules, i.e. coeff * aux).
        per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return per_token.float().mean()

    info = {"backends": backends.describe(), "dispatcher": backends.dispatcher,
            "lm_loss": backends.lm_loss, "fusion": "on" if backends.fusion else "off"}
    return Workload(model, loss_fn, info)


def build_hf(cfg: Config, dev: torch.device) -> Workload:
    from transformers import MixtralConfig, MixtralForCausalLM

    m, moe = cfg.model, cfg.moe
    hf_cfg = MixtralConfig(
        vocab_size=padded_vocab(cfg.model),  # same padded rows as megatron: same LM-head FLOPs
        hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_kv_heads or m.num_attention_heads,
        head_dim=m.hidden_size // m.num_attention_heads,
        max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_base)},
        num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
        router_aux_loss_coef=moe.aux_loss_coeff, output_router_logits=True,
        router_jitter_noise=0.0, tie_word_embeddings=False, sliding_window=None,
        use_cache=False, initializer_range=m.init_method_std,
    )
    torch.manual_seed(cfg.train.seed)
    with dev:  # allocate and initialize on the device: host init of GBs of weights is slow
        model = MixtralForCausalLM._from_config(
            hf_cfg, attn_implementation="sdpa", dtype=model_dtype(cfg))
    model.train()

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # HF shifts labels itself: give it the inputs. Its loss = CE + coef * aux.
        return model(input_ids=batch["tokens"], labels=batch["tokens"]).loss

    experts = getattr(model.config, "_experts_implementation", None) or "eager"
    return Workload(model, loss_fn, {"experts": experts})


def build_variant(name: str, cfg: Config, dev: torch.device) -> Workload:
    if name == "hf":
        return build_hf(cfg, dev)
    return build_megatron(variant_config(cfg, name))


def make_optimizer(params: list[torch.nn.Parameter], cfg: Config) -> torch.optim.Optimizer:
    o = cfg.optimizer
    fused = params[0].is_cuda  # the single-kernel CUDA AdamW; CPU uses the foreach path
    return torch.optim.AdamW(params, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2),
                             eps=o.adam_eps, weight_decay=o.weight_decay, fused=fused or None)


def train_step(w: Workload, opt: torch.optim.Optimizer, params: list, batch: dict,
               clip: float) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    loss = w.loss_fn(batch)
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    opt.step()
    return loss.detach()


def make_step(w: Workload, opt: torch.optim.Optimizer, params: list, batch: dict, clip: float,
              cuda_graph: bool) -> Callable[[], torch.Tensor]:
    """One training step as a no-argument callable; with ``cuda_graph`` its forward+backward is
    captured after two eager calls and replayed (megatron_ext.training.cuda_graph), as
    ``train.cuda_graph`` does in the training loop."""
    if not cuda_graph:
        return functools.partial(train_step, w, opt, params, batch, clip)
    from megatron_ext.training.cuda_graph import StepGraph

    graph = StepGraph()

    def forward_backward() -> torch.Tensor:
        loss = w.loss_fn(batch)
        loss.backward()
        return loss.detach()

    def step() -> torch.Tensor:
        if not graph.captured:  # afterwards the gradients' memory belongs to the graph
            opt.zero_grad(set_to_none=True)
        loss = graph.run(forward_backward).clone()  # the graph's output is overwritten
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        opt.step()
        return loss

    return step


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    """Drop what megatron keeps between models so the next variant's peak is its own."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    # Drop the router-loss tracker's entries: they are sized by the first model's layer count.
    get_moe_layer_wise_logging_tracker().clear()
    # Unfused attention keeps its [b*heads, s, s] score buffer in this global pool.
    if parallel_state._GLOBAL_MEMORY_BUFFER is not None:
        parallel_state.destroy_global_memory_buffer()
        parallel_state._set_global_memory_buffer()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_variant(name: str, cfg: Config, opts: BenchOptions, batch: dict,
                    out_dir: Path | None) -> dict[str, Any]:
    """Build, warm up, time, optionally profile, and free one variant."""
    dev = device()
    base, extra = split_variant(name)
    report.reset_peak_memory()
    t_build = time.perf_counter()
    w = build_variant(base, cfg, dev)
    params = [p for p in w.model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    sync()
    build_s = time.perf_counter() - t_build
    weights_gib = report.allocated_gib()
    graphed = base != "hf" and cfg.train.cuda_graph and torch.cuda.is_available()
    step = make_step(w, opt, params, batch, cfg.optimizer.clip_grad, graphed)
    for _ in range(opts.warmup):
        step()
    sync()
    activations_gib = held_activations_gib(w, batch)
    times, losses = [], []
    for _ in range(opts.steps):
        t0 = time.perf_counter()
        losses.append(step())
        sync()
        times.append(time.perf_counter() - t0)
    peak = report.peak_memory_gib()
    tokens = cfg.train.micro_batch_size * cfg.data.seq_length
    tok_s = tokens * len(times) / sum(times)
    tflops = tok_s * flops_per_token(cfg.model, cfg.moe, cfg.data.seq_length) / 1e12
    result = {
        "status": "ok",
        "includes": VARIANT_NOTES[base].format(**w.info) + "".join(f"; {e}" for e in extra)
                    + ("; forward+backward replayed as one CUDA graph" if graphed else ""),
        "cuda_graph": graphed,
        "micro_batch": cfg.train.micro_batch_size,
        "tokens_per_s": tok_s, "model_tflops": tflops, "mfu": tflops / opts.peak_tflops,
        "step_ms_mean": 1e3 * sum(times) / len(times), "step_ms_min": 1e3 * min(times),
        "step_ms_max": 1e3 * max(times), "peak_memory_gib": peak["gib"],
        "activations_gib": activations_gib,
        "peak_memory_kind": peak["kind"], "memory_after_build_gib": weights_gib,
        "params": sum(p.numel() for p in params), "build_s": build_s,
        "losses": [float(x) for x in losses], **w.info,
    }
    wanted = (name in opts.profile_variants if opts.profile_variants is not None
              else not extra)  # by default ablations give numbers only
    if opts.profile and wanted and out_dir is not None:
        result["profile"] = report.profile_steps(
            step, name, out_dir, opts.profile_steps, trace=(base == "ours"),
            trace_max_mb=opts.trace_max_mb)
    del w, opt, params, losses, step
    free_memory()
    return result


def held_activations_gib(w: Workload, batch: dict) -> float:
    """What one forward keeps for backward (autograd's saved tensors, parameters excluded): the
    same measure for every variant, HF included, on any device. Outside the timed steps."""
    with saved_activation_bytes(w.model.parameters()) as held:
        loss = w.loss_fn(batch)
        sync()
        n = held()
    del loss
    return n / 1024**3


def ratios(results: dict[str, dict]) -> dict[str, float]:
    out = {}
    for name, ours in results.items():
        if name in ("hf", "plain"):
            continue
        for other in ("hf", "plain"):
            theirs = results.get(other, {})
            if ours.get("status") == "ok" and theirs.get("status") == "ok":
                out[f"{name}/{other}"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
    return out


def run_benchmark(opts: BenchOptions, out_dir: Path | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure the requested variants in turn; a failing variant (e.g. OOM) is recorded and
    the others still run. Returns the JSON-ready results."""
    from megatron_ext.platform.dist import init_distributed

    cfg = bench_config(opts)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    init_distributed(cfg)  # world 1: nccl on GPU, gloo + the CPU redirections otherwise
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    batches: dict[tuple[int, int], dict] = {}  # same tokens for every variant of one shape
    results: dict[str, dict] = {}
    for name in opts.variants:
        log(f"[bench] {name}: building and measuring ...")
        try:
            vcfg = bench_config(opts, split_variant(name)[1])
            shape = (vcfg.train.micro_batch_size, vcfg.data.seq_length)
            if shape not in batches:
                batches[shape] = make_batch(vcfg, device(), vcfg.train.seed)
            results[name] = measure_variant(name, vcfg, opts, batches[shape], out_dir)
        except Exception as e:  # noqa: BLE001 - recorded; other variants must still run
            results[name] = {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000]}
        # Outside the except block: the traceback (which pins the failed model) is gone.
        free_memory()
        r = results[name]
        if r["status"] == "ok":
            log(f"[bench] {name}: {r['tokens_per_s']:,.0f} tokens/s, "
                f"{r['model_tflops']:.3g} TFLOP/s, peak {r['peak_memory_gib']:.2f} GiB")
        else:
            log(f"[bench] {name}: FAILED {r['error']}")
    meta = report.environment(cfg, opts, flops_per_token(cfg.model, cfg.moe, cfg.data.seq_length))
    return {
        "meta": meta,
        "step": STEP_NOTE,
        "variants": results,
        "ratios": ratios(results),
    }
