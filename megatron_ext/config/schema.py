"""The typed configuration tree: each field declared once, with all that is checked about it.

Every run is described by one ``Config``; each component receives only its own section.
Each field's docstring-comment is the user documentation (``--print-config`` shows the values,
``docs/config.md`` is generated from these comments by ``megatron_ext.config.docs``).
A number or list field declares its bounds, and a field whose change on resume differs from
its section's declares its resume policy, through ``setting`` (``config/fields.py``); the
loader enforces the bounds on every Config it builds, ``checkpoint/resume_check.py`` the
policies. Adding a field is this one line plus its docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_ext.config.fields import (
    ARCH,
    FREE,
    INT32_MAX,
    LR_MAX,
    RUN,
    SEED_MAX,
    STEPS_MAX,
    Entries,
    Items,
    Range,
    section,
    setting,
)


@dataclass
class ModelConfig:
    # Resume: tensor shapes are ARCH (a checkpoint of another shape cannot be loaded); the
    # section's other fields change what is computed (RUN) unless marked FREE.
    num_layers: int = setting(2, bounds=Range(1, 1024), resume=ARCH)
    """Transformer layers."""
    hidden_size: int = setting(64, bounds=Range(1, 65536), resume=ARCH)
    """Model width."""
    num_attention_heads: int = setting(4, bounds=Range(1, 1024), resume=ARCH)
    """Query heads."""
    num_kv_heads: int | None = setting(None, bounds=Range(1, 1024), resume=ARCH)
    """Key/value heads (grouped-query attention when fewer than the query heads); None = heads."""
    ffn_hidden_size: int = setting(256, bounds=Range(1, 262144), resume=ARCH)
    """SwiGLU intermediate size d_ff (per expert in MoE layers)."""
    vocab_size: int = setting(256, bounds=Range(1, INT32_MAX), resume=ARCH)
    """Tokenizer vocabulary; the model pads it to a multiple of `vocab_multiple`."""
    vocab_multiple: int = setting(128, bounds=Range(1, 65536), resume=ARCH)
    """Pad the embedding/output rows to a multiple of this (must divide by the tensor-parallel size)."""
    max_position_embeddings: int = setting(4096, bounds=Range(2, 2**22))
    """Longest sequence the RoPE tables are built for."""
    # megatron's GPTModel takes int(rotary_base); below 2 the RoPE frequencies do not decay.
    rotary_base: float = setting(10000.0, bounds=Range(2, 1e12, whole=True))
    """RoPE theta."""
    norm_epsilon: float = setting(1e-5, bounds=Range(0, 1, lo_open=True))
    """RMSNorm epsilon."""
    init_method_std: float = setting(0.02, bounds=Range(0, 1, lo_open=True))
    """Std of the normal init for linear and embedding weights (from-scratch runs)."""
    # Implementation choices that compute the same function are FREE on resume (flash, SDPA
    # and TE attention, the fused loss head, torch.compile'd kernels are interchangeable).
    attention_backend: Literal["auto", "te", "flash", "sdpa", "unfused"] = setting(
        "auto", resume=FREE)
    """Core attention: auto picks Transformer Engine, then flash-attn, then PyTorch SDPA."""
    lm_loss: Literal["fused", "megatron"] = setting("fused", resume=FREE)
    """Training loss head: fused = output layer + cross-entropy in one function with model-dtype logits and chunked fp32 math (less memory); megatron = output_layer then vocab_parallel_cross_entropy."""
    kernel_fusion: bool | None = setting(None, resume=FREE)
    """torch.compile'd elementwise fusions (SwiGLU, RMSNorm, RoPE, the fused loss's softmax); None = on with CUDA."""


@dataclass
class MoEConfig:
    num_experts: int = setting(0, bounds=Range(0, 1024), resume=ARCH)
    """Experts per MoE layer; 0 builds a dense model."""
    top_k: int = setting(2, bounds=Range(1, 1024))
    """Experts each token is routed to (weights renormalized over the top-k, as in Mixtral; top-1 uses Switch's softmax over all experts)."""
    aux_loss_coeff: float = setting(0.02, bounds=Range(0, 100))
    """Load-balancing (Switch) loss coefficient (0 = no load-balancing loss)."""
    aux_loss_scope: Literal["per_layer", "all_layers"] = "per_layer"
    """Which load-balancing loss. per_layer = megatron's: one Switch loss per MoE layer, normalized by top_k (1 at balance), aux_loss_coeff x their sum in the objective; aux_loss logs their mean. all_layers = the paper's stack (transformers' load_balancing_loss_func, moe-recipes v1.0.0): ONE Switch loss over the router logits of every MoE layer together, per micro-batch (top_k at balance), aux_loss_coeff applied once; aux_loss logs it. all_layers needs parallel.pipeline = 1 and no recomputation of whole MoE layers. See docs/fidelity.md."""
    z_loss_coeff: float | None = setting(None, bounds=Range(0, 100))
    """Router z-loss coefficient; None disables it."""
    # Dispatchers and grouped-GEMM experts are interchangeable and checkpoint-compatible.
    token_dispatcher: Literal["auto", "alltoall", "allgather", "local"] = setting(
        "auto", resume=FREE)
    """Token dispatcher. local: no expert/tensor parallelism, dropless, no host syncs; auto = local where it applies, else alltoall on GPU and allgather on CPU (gloo lacks alltoall of splits)."""
    grouped_gemm: bool = setting(True, resume=FREE)
    """Run all local experts in one grouped GEMM per projection (falls back to a loop on CPU)."""
    layer_freq: int | list = setting(
        1, bounds=(Range(1, 1024), Items(Range(0, 1), integers=True, max_len=1024)), resume=ARCH)
    """Every N-th layer is MoE (1 = all), or an explicit 0/1 list with one entry per layer."""
    capacity_factor: float | None = setting(None, bounds=Range(0, 1024, lo_open=True))
    """Expert capacity factor; None = dropless. Overflow tokens are dropped when set."""
    token_drop_policy: Literal["probs", "position"] = "probs"
    """Which tokens are dropped past capacity: lowest router probability, or latest position."""
    pad_to_capacity: bool = False
    """Pad every expert's input to its full capacity (static shapes)."""


@dataclass
class ParallelConfig:
    tensor: int = setting(1, bounds=Range(1, 1024))
    """Tensor-parallel size."""
    pipeline: int = setting(1, bounds=Range(1, 1024))
    """Pipeline-parallel size (megatron's 1F1B schedule; the layers are split into this many
    stages, the embedding on the first and the LM loss on the last)."""
    virtual_pipeline: int | None = setting(None, bounds=Range(1, 1024))
    """Model chunks per pipeline stage (megatron's interleaved schedule; needs pipeline > 1 and
    micro-batches per step a multiple of pipeline). None or 1 = not interleaved."""
    first_stage_layers: int | None = setting(None, bounds=Range(1, 1024))
    """Transformer layers on the first pipeline stage (it also holds the embedding); None = an
    even split."""
    last_stage_layers: int | None = setting(None, bounds=Range(1, 1024))
    """Transformer layers on the last pipeline stage (it also holds the LM head and loss);
    None = an even split."""
    expert: int = setting(1, bounds=Range(1, 1024))
    """Expert-parallel size (experts are split across this many data-parallel ranks)."""
    sequence_parallel: bool = False
    """Sequence parallelism (needs tensor > 1)."""
    distributed_optimizer: bool | None = None
    """Shard optimizer state over data-parallel ranks; None = on for GPU, off for CPU."""
    world_size: int | None = setting(None, bounds=Range(1, 2**20))
    """Processes the run is planned for (dry-run / validation). None = read from the launcher."""


@dataclass
class OptimizerConfig:
    lr: float = setting(2e-4, bounds=Range(0, LR_MAX))
    """Peak learning rate."""
    min_lr: float = setting(2e-5, bounds=Range(0, LR_MAX))
    """Learning rate at the end of the cosine decay."""
    weight_decay: float = setting(0.1, bounds=Range(0, 10))
    """AdamW decoupled weight decay (the parameters it applies to: weight_decay_scope)."""
    weight_decay_scope: Literal["exclude_1d", "all"] = "exclude_1d"
    """Parameters weight decay applies to. exclude_1d = megatron's default: not to 1-D parameters (RMSNorm weights, biases); all = every parameter, norms and routers included, as the paper's stack (torch.optim.AdamW(model.parameters()))."""
    adam_beta1: float = setting(0.9, bounds=Range(0, 1, hi_open=True))
    """AdamW beta1."""
    adam_beta2: float = setting(0.95, bounds=Range(0, 1, hi_open=True))
    """AdamW beta2."""
    adam_eps: float = setting(1e-8, bounds=Range(0, 1, lo_open=True))
    """AdamW epsilon."""
    clip_grad: float = setting(1.0, bounds=Range(0, 1e6))
    """Global gradient-norm clip; 0 disables clipping."""
    grad_divisor: float = setting(1.0, bounds=Range(0, 1e6, lo_open=True))
    """Clipping and AdamW act on the step's mean gradient divided by this (implemented exactly: the clipping coefficient from grad_norm / grad_divisor, adam_eps x grad_divisor on the undivided gradient, whose norm grad_norm logs; clipped about when grad_norm > clip_grad x grad_divisor). The paper's stack divided its loss by the accumulation steps twice (moe-recipes, then DeepSpeed): its optimizer saw the mean gradient / accumulation steps (8 at 8x152M, 2 at 8x1.5B and 8x3.7B). 1 = the mean gradient."""


@dataclass
class ScheduleConfig:
    warmup_steps: int = setting(2, bounds=Range(0, STEPS_MAX))
    """Linear warmup steps (the paper: 2000)."""
    warmup_init_lr: float | None = setting(None, bounds=Range(0, LR_MAX))
    """LR the warmup starts from; None = min_lr (as the paper's stack did)."""
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup, to min_lr at the last step."""
    decay_steps: int | None = setting(None, bounds=Range(1, STEPS_MAX))
    """Steps over which warmup+decay run; None = train.train_steps."""


@dataclass
class TrainConfig:
    global_batch_size: int = setting(8, bounds=Range(1, 2**24))
    """Sequences per optimizer step (across all data-parallel ranks)."""
    # Resume: batch, length, seed and precision change the run; the rest of the section is
    # observation, recomputation, capture or failure policy (FREE). micro_batch_size only
    # splits the same global batch into another number of accumulation steps.
    micro_batch_size: int = setting(2, bounds=Range(1, 2**16), resume=FREE)
    """Sequences per forward/backward on one rank; gradients accumulate to the global batch."""
    train_steps: int | None = setting(30, bounds=Range(1, STEPS_MAX))
    """Optimizer steps. Give this or train_tokens."""
    train_tokens: int | None = setting(None, bounds=Range(1, 2**62))
    """Train until this many tokens (rounded up to whole steps); overrides train_steps."""
    seed: int = setting(1234, bounds=Range(0, SEED_MAX))
    """Seed for weights, dropout and data order."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto = bf16 on GPU, fp32 on CPU."""
    log_interval: int = setting(1, bounds=Range(1, STEPS_MAX), resume=FREE)
    """Steps between log lines / metrics records."""
    eval_interval: int = setting(0, bounds=Range(0, STEPS_MAX), resume=FREE)
    """Steps between validation runs; 0 disables validation."""
    eval_iters: int = setting(2, bounds=Range(1, 2**20), resume=FREE)
    """Validation batches (of global_batch_size) per validation run."""
    max_skipped_steps: int = setting(10, bounds=Range(0, STEPS_MAX), resume=FREE)
    """Non-finite loss/grad-norm steps that are skipped before the run stops."""
    peak_tflops: float = setting(989.0, bounds=Range(0, 1e6, lo_open=True), resume=FREE)
    """Per-device peak (dense bf16) used for MFU; 989 = H100 SXM data sheet."""
    recompute: Literal["none", "selective", "full"] = setting("none", resume=FREE)
    """Activation recomputation: selective = the parts in recompute_modules; full = whole layers."""
    recompute_modules: list = setting(factory=lambda: ["core_attn"],
                                      bounds=Items(strings=True, max_len=16), resume=FREE)
    """With recompute: selective, what backward recomputes instead of keeping from forward
    (megatron-core's choices): core_attn (attention; little to gain with SDPA/flash, which keep
    no score matrix), layernorm (both RMSNorms' outputs), moe_act (the experts' SwiGLU output;
    grouped experts), mlp (dense MLP layers), moe (whole MoE layers)."""
    cuda_graph: bool = setting(False, resume=FREE)
    """Capture each step's forward+backward (all micro-batches) as one CUDA graph after two
    eager steps, and replay it: removes the host launch overhead that bounds small models on a
    GPU (8x152M). Needs the local token dispatcher (no expert/tensor parallelism, no capacity
    factor) and no recomputation. Ignored, with a warning, on the CPU."""
    deterministic: bool = setting(True, resume=FREE)
    """Fix CPU threads and pick deterministic algorithms so reruns are bit-identical on CPU."""


@dataclass
class DataConfig:
    mock: bool = True
    """Use megatron-core's mock GPT dataset (random tokens) instead of `blend`."""
    # [weight, prefix, ...]: megatron needs positive weights (a NaN weight passes its check).
    blend: list = setting(factory=list,
                          bounds=Items(Range(0, 1e12, lo_open=True), strings=True))
    """[weight, prefix, weight, prefix, ...] or [prefix, ...] of Megatron .bin/.idx datasets."""
    split: str = "998,1,1"
    """Train/validation/test split of each dataset, as relative weights."""
    seq_length: int = setting(128, bounds=Range(2, 2**22))
    """Tokens per training sequence."""
    tokenizer: str | None = None
    """SentencePiece .model file or Hugging Face tokenizer directory."""
    cache_dir: str | None = setting(None, resume=FREE)  # the indices are the same
    """Where dataset index caches go; None = next to the data."""
    demo_corpus: bool = False
    """Build the shipped demo corpus (English, Japanese, Python code; tokenizer + .bin/.idx, cached) and train on it: on all three languages, or on those `blend` names (e.g. [demo:en] or [1, demo:en, 1, demo:code])."""
    valid_sets: dict = setting(  # a blend each, with its bounds; FREE: evaluated, not trained
        factory=dict, bounds=Entries(Items(Range(0, 1e12, lo_open=True), strings=True)),
        resume=FREE)
    """Named validation sets, name -> prefix or [weight, prefix, ...] blend (demo:en, demo:ja, demo:code name the demo corpus and apply only with demo_corpus: true). Each uses its held-out documents (data.split's validation part), the same samples at every eval_interval, logged as valid/<name>/loss and /ppl; the training blend's held-out split stays val_loss."""


@dataclass
class CheckpointConfig:
    save: str | None = None
    """Directory for this run's checkpoints; a run with checkpoints there resumes automatically."""
    load: str | None = None
    """Initial weights only (e.g. an upcycled MoE); the optimizer starts fresh."""
    save_interval: int = setting(0, bounds=Range(0, STEPS_MAX))
    """Steps between saves; 0 = save only at the end (and on preemption)."""
    keep_last: int = setting(2, bounds=Range(1, 2**20))
    """Checkpoints kept that verify (sizes and checksums); older ones are deleted after a successful save, damaged ones never count."""
    fully_reshardable_optimizer: bool = True
    """Save optimizer state in the format that reshards across TP/PP/EP changes."""
    async_save: bool = False
    """Write checkpoints in a background process per rank (megatron's async dist_checkpointing):
    training stops only to copy the state to host memory. A save becomes ``latest`` once every
    rank has finished writing; the final and preemption saves are waited for before exit."""
    verify_checksums: bool = True
    """Compare every checkpoint file with the checksum recorded at save before using it (resume,
    `load`, pruning): a full read of the checkpoint. false checks file sizes only (one warning)."""
    allow_config_change: bool = False
    """Resume `save` even though this config changes the run (optimizer, schedule, data, batch,
    steps, precision, model/MoE hyperparameters: the fields marked `run` here): the differing
    fields are logged as a warning instead of refusing the resume. Shapes can never change."""


@dataclass
class WandbConfig:
    mode: Literal["online", "offline", "disabled"] = "disabled"
    """online needs credentials and the server, else it logs offline (one warning).
    WANDB_MODE overrides the config file (`--set` overrides both)."""
    project: str = "drop-upcycling"
    """W&B project. WANDB_PROJECT overrides the config file."""
    entity: str | None = None
    """W&B team or user; None = W&B's default entity. WANDB_ENTITY overrides the config file."""
    group: str | None = None
    """W&B run group (e.g. one per experiment); None = no group. WANDB_RUN_GROUP overrides the
    config file."""
    dir: str | None = None
    """Directory W&B writes its files in (a `wandb/` directory inside); None = `output_dir`.
    WANDB_DIR overrides the config file."""
    name: str | None = None
    """Run name; None = the config file's name."""
    tags: list = setting(factory=list, bounds=Items(strings=True, max_len=1024))
    """Run tags."""
    init_timeout_s: float = setting(30.0, bounds=Range(0, 86400, lo_open=True))
    """Longest wait for W&B to start a run; online past it, training goes on logging offline."""
    finish_timeout_s: float = setting(60.0, bounds=Range(0, 86400, lo_open=True))
    """Longest wait at the end for W&B to upload; what is left stays on disk for `wandb sync`."""


@dataclass
class LoggingConfig:
    output_dir: str | None = None
    """Run directory: resolved config, metrics.jsonl, TensorBoard events. None = runs/<config
    file name without .yaml> (runs/default without --config). One run at a time per directory."""
    tensorboard: bool = False
    """Also write TensorBoard events."""
    expert_load: bool = True
    """Log per-layer expert load, load imbalance and routing entropy."""
    expert_similarity: bool = True
    """Log per-layer mean/min/max pairwise cosine similarity of the experts' weights."""
    wandb: WandbConfig = section(WandbConfig)
    """Weights & Biases. Precedence, highest first: `--set logging.wandb.*`, then the variables
    WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY, WANDB_RUN_GROUP and WANDB_DIR, then the config
    file, then the defaults here. The resolved config.yaml records the values used."""


@dataclass
class UpcyclingConfig:
    method: Literal["scratch", "naive", "noise", "drop", "btx"] = "drop"
    """Dense -> MoE initializer used by moe-upcycle."""
    ratio: float = setting(0.5, bounds=Range(0, 1))
    """Drop-Upcycling re-initialization ratio r (also the noise subset ratio)."""
    seed: int = setting(1234, bounds=Range(0, SEED_MAX))
    """Seed of the upcycler."""
    index_sharing: Literal["per_projection", "shared"] = "per_projection"
    """per_projection = the published code; shared = the paper's equations."""
    router_init: Literal["uniform_std002", "normal_std002"] = "uniform_std002"
    """Router weight init."""
    noise_std: float = setting(0.02, bounds=Range(0, 1, lo_open=True))
    """Std of the noise added by the `noise` method."""
    # FREE: only the first start reads it (through checkpoint.load); a resume ignores it
    dense_base: str | None = setting(None, resume=FREE)
    """Dense Llama the recipe starts from: a local HF directory, one of our checkpoints, or a Hugging Face repo id `org/name[@revision]` (through huggingface_hub's cache: HF_HOME, HF_HUB_OFFLINE). Set, `moe-recipe` (which the scripts/slurm jobs run first) upcycles it with this section into `checkpoint.load`, then training starts from there; None = no upcycling step."""


@dataclass
class EvalConfig:
    tasks: list = setting(factory=list, bounds=Items(strings=True, max_len=256))
    """lm-evaluation-harness tasks run on the current weights during training (e.g. the local demo_en_mc; see tasks/README.md); their metrics are logged as tasks/<task>/<metric> beside the losses."""
    task_interval: int = setting(0, bounds=Range(0, STEPS_MAX))
    """Steps between in-loop task evaluations (0 = never); they run on rank 0 and need an unsplit model (parallel.tensor = parallel.expert = 1)."""
    limit: int | None = setting(None, bounds=Range(1, 2**31))
    """Items per task in in-loop evaluation (None = all)."""
    batch_size: int = setting(8, bounds=Range(1, 2**16))
    """Requests per forward in in-loop evaluation."""


@dataclass
class ClusterConfig:
    """The machines a run is planned for (``--plan``, ``--dry-run``); training never reads it.
    Defaults: the paper's TSUBAME 4.0 nodes, 4x H100 SXM 80GB per node. The bounds: past them,
    no machine the planner could describe exists."""

    gpus_per_node: int = setting(4, bounds=Range(1, 1024))
    """GPUs (processes) per node; groups of up to this many consecutive ranks talk over NVLink."""
    gpu: str = "H100-SXM"
    """GPU model, for the report only (the numbers below are what the planner uses)."""
    peak_tflops: float = setting(989.0, bounds=Range(0, 1e6, lo_open=True))
    """Dense bf16 peak per GPU, TFLOP/s (H100 SXM data sheet); the planner's MFU is against it."""
    memory_gb: float = setting(80.0, bounds=Range(0, 1e5, lo_open=True))
    """Device memory per GPU, GiB (H100 80GB; the driver reports 79.6 GiB of it)."""
    usable_memory_fraction: float = setting(0.9, bounds=Range(0, 1, lo_open=True))
    """Share of `memory_gb` a layout's estimate may use (CUDA context, NCCL buffers, allocator
    fragmentation and the estimate's own error take the rest)."""
    hbm_gbs: float = setting(3350.0, bounds=Range(0, 1e6, lo_open=True))
    """Device-memory bandwidth, GB/s (H100 SXM data sheet: 3.35 TB/s); memory-bound kernels."""
    intra_node_gbs: float = setting(450.0, bounds=Range(0, 1e6, lo_open=True))
    """NVLink bandwidth per GPU per direction, GB/s: NVLink 4 has 18 links x 25 GB/s = 450
    (NVIDIA's "900 GB/s" counts both directions)."""
    inter_node_gbs: float = setting(100.0, bounds=Range(0, 1e6, lo_open=True))
    """InfiniBand bandwidth per node per direction, GB/s: 4 x 200 Gb/s NDR200 = 4 x 25 GB/s,
    shared by the node's GPUs (one rail each)."""
    intra_node_latency_us: float = setting(5.0, bounds=Range(0, 1e6))
    """Per collective step over NVLink, microseconds (NCCL's small-message latency)."""
    inter_node_latency_us: float = setting(10.0, bounds=Range(0, 1e6))
    """Per collective step over InfiniBand, microseconds."""


@dataclass
class Config:
    # The resume policy of each section's fields that declare none (see checkpoint/resume_check.py).
    model: ModelConfig = section(ModelConfig, resume=RUN)
    moe: MoEConfig = section(MoEConfig, resume=RUN)
    parallel: ParallelConfig = section(ParallelConfig, resume=FREE)  # a resume reshards
    optimizer: OptimizerConfig = section(OptimizerConfig, resume=RUN)
    schedule: ScheduleConfig = section(ScheduleConfig, resume=RUN)
    train: TrainConfig = section(TrainConfig, resume=RUN)
    data: DataConfig = section(DataConfig, resume=RUN)
    checkpoint: CheckpointConfig = section(CheckpointConfig, resume=FREE)
    logging: LoggingConfig = section(LoggingConfig, resume=FREE)
    eval: EvalConfig = section(EvalConfig, resume=FREE)
    upcycling: UpcyclingConfig = section(UpcyclingConfig, resume=RUN)
    cluster: ClusterConfig = section(ClusterConfig, resume=FREE)  # training never reads it
