"""Cross-field checks, run before any process group or tensor exists.

Each failure raises ConfigError with ``field: reason`` so the CLI can print one line and exit 2.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from megatron_ext.config.derived import active_valid_sets, names_demo_corpus, total_steps
from megatron_ext.config.fields import clip, short_repr
from megatron_ext.config.loader import ConfigError
from megatron_ext.config.ranges import check_ranges, check_sizes
from megatron_ext.config.schema import Config


def planned_world_size(cfg: Config, launched: int = 1) -> int:
    """What --dry-run / --print-config reason about: the config's plan (parallel.world_size),
    else ``launched``, the launch's process count (``platform.launch.world_size()``; config sits
    below platform and does not read the launcher's environment itself)."""
    if cfg.parallel.world_size is not None:
        return cfg.parallel.world_size
    return launched


def data_parallel_size(cfg: Config, world_size: int | None = None) -> int:
    world = planned_world_size(cfg) if world_size is None else world_size
    return world // (cfg.parallel.tensor * cfg.parallel.pipeline)


def _check(cond: bool, field: str, reason: str) -> None:
    if not cond:
        raise ConfigError(f"{field}: {reason}")


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Raise ConfigError for the first problem. ``world_size``: the processes the checks assume,
    given by the caller (a launch: its real size; --dry-run: ``planned_world_size``); None =
    the config's plan (parallel.world_size, else one process)."""
    # Every value in its declared range first (ranges.RANGES): the cross-field checks below
    # then never divide by zero or multiply absurd sizes.
    check_ranges(cfg)
    world = planned_world_size(cfg) if world_size is None else world_size
    _check_model(cfg)
    _check_moe(cfg)
    dp = _check_layout(cfg, world)
    steps = _check_batch_and_schedule(cfg, dp)
    _check_recompute(cfg)
    _check_aux_loss_scope(cfg)
    _check_cuda_graph(cfg)
    _check_data(cfg)
    _check_dense_base(cfg)
    check_sizes(cfg, steps)


def _check_model(cfg: Config) -> None:
    m, par = cfg.model, cfg.parallel
    kv = m.num_kv_heads or m.num_attention_heads
    _check(m.hidden_size % m.num_attention_heads == 0, "model.hidden_size",
           f"{m.hidden_size} is not divisible by num_attention_heads={m.num_attention_heads}")
    _check(m.num_attention_heads % kv == 0, "model.num_kv_heads",
           f"num_attention_heads={m.num_attention_heads} is not divisible by num_kv_heads={kv}")
    _check(m.num_attention_heads % par.tensor == 0, "parallel.tensor",
           f"num_attention_heads={m.num_attention_heads} is not divisible by tensor={par.tensor}")
    _check(kv % par.tensor == 0, "parallel.tensor",
           f"num_kv_heads={kv} is not divisible by tensor={par.tensor}")
    _check(m.vocab_multiple % par.tensor == 0, "model.vocab_multiple",
           f"{m.vocab_multiple} is not divisible by tensor={par.tensor}")
    _check(m.ffn_hidden_size % par.tensor == 0, "parallel.tensor",
           f"ffn_hidden_size={m.ffn_hidden_size} is not divisible by tensor={par.tensor}")


def _check_moe(cfg: Config) -> None:
    m, moe, par = cfg.model, cfg.moe, cfg.parallel
    if moe.num_experts == 0:
        _check(par.expert == 1, "parallel.expert", "expert parallelism needs moe.num_experts > 0")
        return
    _check(moe.top_k <= moe.num_experts, "moe.top_k",
           f"top_k={moe.top_k} must be between 1 and num_experts={moe.num_experts}")
    _check(moe.num_experts % par.expert == 0, "parallel.expert",
           f"num_experts={moe.num_experts} is not divisible by expert={par.expert}")
    if isinstance(moe.layer_freq, list):  # entries are 0/1 (ranges.RANGES)
        _check(len(moe.layer_freq) == m.num_layers, "moe.layer_freq",
               f"has {len(moe.layer_freq)} entries, expected num_layers={m.num_layers}")
        _check(any(moe.layer_freq), "moe.layer_freq", "no layer is MoE; set num_experts: 0")
    _check(not moe.pad_to_capacity or moe.capacity_factor is not None,
           "moe.pad_to_capacity", "needs moe.capacity_factor")
    if moe.token_dispatcher == "local":
        _check(par.expert == 1 and par.tensor == 1, "moe.token_dispatcher",
               "local needs parallel.expert=1 and parallel.tensor=1 (use auto)")
        _check(moe.capacity_factor is None, "moe.token_dispatcher",
               "local is dropless; with moe.capacity_factor use allgather or alltoall")


def _check_layout(cfg: Config, world: int) -> int:
    """The parallel layout on ``world`` processes; returns the data-parallel size."""
    moe, par = cfg.moe, cfg.parallel
    _check(not par.sequence_parallel or par.tensor > 1, "parallel.sequence_parallel",
           "needs tensor > 1")
    _check(moe.num_experts == 0 or par.tensor == 1 or par.sequence_parallel,
           "parallel.sequence_parallel", "megatron-core needs it for MoE with tensor > 1")
    _check_pipeline(cfg)
    _check(world % (par.tensor * par.pipeline) == 0, "parallel.tensor",
           f"world size {world} is not divisible by tensor*pipeline={par.tensor * par.pipeline}")
    dp = world // (par.tensor * par.pipeline)
    _check(dp % par.expert == 0, "parallel.expert",
           f"data-parallel size {dp} (world {world} / tensor*pipeline) is not divisible by "
           f"expert={par.expert}")
    return dp


def _check_pipeline(cfg: Config) -> None:
    """Stages and virtual stages (model chunks) each get a whole number of layers, at least
    one (megatron's split; the first/last stage may be set apart from the even rest)."""
    par, n = cfg.parallel, cfg.model.num_layers
    vpp = par.virtual_pipeline or 1
    first, last = par.first_stage_layers, par.last_stage_layers
    if par.pipeline == 1:
        for field, value in (("virtual_pipeline", par.virtual_pipeline if vpp > 1 else None),
                             ("first_stage_layers", first), ("last_stage_layers", last)):
            _check(value is None, f"parallel.{field}", "needs parallel.pipeline > 1")
        return
    for field, value in (("first_stage_layers", first), ("last_stage_layers", last)):
        _check(value is None or value % vpp == 0, f"parallel.{field}",
               f"{value} is not divisible by virtual_pipeline={vpp}")
    rest = n - (first or 0) - (last or 0)
    middle = par.pipeline - (first is not None) - (last is not None)
    if middle == 0:
        _check(rest == 0, "parallel.first_stage_layers",
               f"first_stage_layers + last_stage_layers = {n - rest} must equal "
               f"model.num_layers={n} with pipeline=2")
        return
    what = ("model.num_layers" if first is None and last is None
            else "the layers left by first/last_stage_layers")
    _check(rest >= middle * vpp and rest % (middle * vpp) == 0,
           "parallel.pipeline" if what == "model.num_layers" else "parallel.first_stage_layers",
           f"{what} ({rest}) must split into {middle} stage(s) x virtual_pipeline={vpp} "
           f"chunks of at least one layer each")


def _check_batch_and_schedule(cfg: Config, dp: int) -> int:
    """Batch sizes, run length and LR schedule; returns the number of optimizer steps."""
    tr, opt = cfg.train, cfg.optimizer
    _check(tr.global_batch_size % (tr.micro_batch_size * dp) == 0, "train.global_batch_size",
           f"{tr.global_batch_size} is not divisible by micro_batch_size*data_parallel="
           f"{tr.micro_batch_size}*{dp}")
    par, micro = cfg.parallel, tr.global_batch_size // (tr.micro_batch_size * dp)
    # megatron's interleaved schedule runs the micro-batches in groups of `pipeline`.
    _check((par.virtual_pipeline or 1) == 1 or micro % par.pipeline == 0,
           "parallel.virtual_pipeline", f"the interleaved schedule needs micro-batches per step "
           f"({micro}) to be a multiple of pipeline={par.pipeline}")
    _check(tr.train_steps is not None or tr.train_tokens is not None, "train.train_steps",
           "give train_steps or train_tokens")
    _check(opt.min_lr <= opt.lr, "optimizer.min_lr",
           f"need 0 <= min_lr ({opt.min_lr}) <= lr ({opt.lr})")
    steps = total_steps(tr, cfg.data.seq_length)
    decay = cfg.schedule.decay_steps or steps
    # megatron's scheduler needs the decay to extend past the warmup.
    _check(cfg.schedule.warmup_steps == 0 or 0 < cfg.schedule.warmup_steps < decay,
           "schedule.warmup_steps",
           f"{cfg.schedule.warmup_steps} must be 0 or less than the decay steps ({decay})")
    return steps


def _check_dense_base(cfg: Config) -> None:
    """The recipe writes the upcycled MoE where training loads it (checkpoint.load), from one
    dense model (btx mixes several: moe-upcycle --btx-sources)."""
    if cfg.upcycling.dense_base is None:
        return
    _check(cfg.checkpoint.load is not None, "upcycling.dense_base",
           "needs checkpoint.load: where the upcycled MoE is written and training starts from")
    _check(cfg.moe.num_experts > 0, "upcycling.dense_base",
           "needs an MoE run (moe.num_experts > 0) to upcycle into")
    _check(cfg.upcycling.method != "btx", "upcycling.dense_base",
           "upcycling.method btx mixes several dense models: run moe-upcycle --btx-sources, "
           "then set checkpoint.load")


def _check_data(cfg: Config) -> None:
    d, m = cfg.data, cfg.model
    _check(d.seq_length <= m.max_position_embeddings, "data.seq_length",
           f"{d.seq_length} exceeds model.max_position_embeddings={m.max_position_embeddings}")
    if not d.mock and not d.demo_corpus:
        _check(len(d.blend) > 0, "data.blend", "empty: no training data (set data.blend and "
               "data.tokenizer, or data.demo_corpus: true, or data.mock: true for random tokens)")
        _check(d.tokenizer is not None, "data.tokenizer", "needed with data.blend")
    if d.demo_corpus:  # the demo tokenizer cannot read other data: only its languages blend
        _check(all(names_demo_corpus(x) for x in d.blend if isinstance(x, str)), "data.blend",
               "with data.demo_corpus it may name only demo corpus languages (demo:en, demo:ja, "
               "demo:code); empty = all of them")
    parts = d.split.split(",")
    _check(len(parts) == 3 and all(p.strip().replace(".", "", 1).isdigit() for p in parts),
           "data.split", f"{short_repr(d.split)} is not like '998,1,1'")
    _check(all(math.isfinite(float(p)) for p in parts), "data.split",
           f"{short_repr(d.split)}: a weight beyond float range")
    _check(float(parts[0]) > 0, "data.split", f"{short_repr(d.split)} leaves no training data")
    _check_valid_sets(cfg)
    _check_eval(cfg)


def _check_eval(cfg: Config) -> None:
    ev, par = cfg.eval, cfg.parallel
    if not ev.tasks or not ev.task_interval:
        return
    # The tasks run on rank 0 alone: its model must be whole (no expert/tensor/pipeline split).
    _check(par.tensor == 1 and par.expert == 1 and par.pipeline == 1, "eval.tasks",
           "in-loop evaluation needs parallel.tensor = parallel.expert = parallel.pipeline = 1 "
           "(evaluate a checkpoint with moe-lm-eval instead)")


def _check_valid_sets(cfg: Config) -> None:
    # Names and sources are the field's declared bounds (schema.py), checked with its type.
    d = cfg.data
    active = active_valid_sets(d)
    if not active:
        return
    _check(not d.mock, "data.valid_sets",
           f"{clip(', '.join(active))}: need real data (data.mock)")
    _check(float(d.split.split(",")[1]) > 0 or not cfg.train.eval_interval, "data.valid_sets",
           f"data.split {short_repr(d.split)} holds out no validation documents")


RECOMPUTE_MODULES = ("core_attn", "layernorm", "moe_act", "mlp", "moe")


def _check_recompute(cfg: Config) -> None:
    tr, moe = cfg.train, cfg.moe
    mods = tr.recompute_modules
    _check(isinstance(mods, list) and all(isinstance(x, str) for x in mods),
           "train.recompute_modules", "must be a list of names")
    unknown = [x for x in mods if x not in RECOMPUTE_MODULES]
    _check(not unknown, "train.recompute_modules",
           f"unknown {short_repr(unknown)}; choose from {', '.join(RECOMPUTE_MODULES)}")
    if tr.recompute != "selective":
        _check(mods == ["core_attn"], "train.recompute_modules",
               f"only used with train.recompute: selective (it is {tr.recompute!r})")
        return
    _check(len(mods) > 0, "train.recompute_modules", "empty: nothing to recompute")
    if "moe_act" in mods or "moe" in mods:
        _check(moe.num_experts > 0, "train.recompute_modules", "moe_act/moe need MoE layers")
    if "moe_act" in mods:
        _check(moe.grouped_gemm, "train.recompute_modules",
               "moe_act needs grouped experts (moe.grouped_gemm: true)")


def _check_aux_loss_scope(cfg: Config) -> None:
    """moe.aux_loss_scope: all_layers is one loss over every MoE layer's routing of a
    micro-batch, built when the last layer's forward ends (model/load_balancing.py). A pipeline
    stage never sees the other stages' routing, and a recomputed MoE layer runs its forward
    again inside the backward, after that loss was built."""
    moe, tr = cfg.moe, cfg.train
    if moe.num_experts == 0 or moe.aux_loss_scope != "all_layers" or moe.aux_loss_coeff == 0:
        return
    _check(cfg.parallel.pipeline == 1, "moe.aux_loss_scope",
           "all_layers (one loss over every layer's routing) needs parallel.pipeline = 1; "
           "with pipeline parallelism use per_layer")
    _check(tr.recompute != "full" and not (tr.recompute == "selective"
                                           and "moe" in tr.recompute_modules),
           "moe.aux_loss_scope", "all_layers cannot be combined with recomputing whole MoE "
           "layers (train.recompute: full, or selective with moe); use per_layer, or "
           "recompute_modules without moe")


def _check_cuda_graph(cfg: Config) -> None:
    """A captured step replays the same kernels on the same buffers: nothing in it may depend
    on the host (megatron's alltoall/allgather dispatchers move token counts to the host; its
    recomputation forks the CUDA RNG state; NaN injection changes the step)."""
    tr, moe, par = cfg.train, cfg.moe, cfg.parallel
    if not tr.cuda_graph:
        return
    if moe.num_experts > 0:
        _check(moe.token_dispatcher in ("auto", "local") and par.expert == 1 and par.tensor == 1
               and moe.capacity_factor is None, "train.cuda_graph",
               "needs the local token dispatcher: parallel.expert=1, parallel.tensor=1, no "
               "moe.capacity_factor, moe.token_dispatcher auto or local")
        _check(moe.grouped_gemm, "train.cuda_graph",
               "needs moe.grouped_gemm: true (the per-expert loop reads token counts on the host)")
    _check(tr.recompute == "none", "train.cuda_graph", "cannot be combined with train.recompute")
    _check(par.pipeline == 1, "train.cuda_graph",
           "cannot be combined with pipeline parallelism (parallel.pipeline > 1)")


def check_paths(cfg: Config) -> None:
    """Existence of the files a training run reads (not part of ``validate``: configs for
    clusters name paths that do not exist on the machine that checks them)."""
    d = cfg.data
    if not d.mock and not d.demo_corpus:
        _check(Path(d.tokenizer).exists(), "data.tokenizer", f"not found: {d.tokenizer}")
        for item in d.blend:
            if isinstance(item, str):
                for ext in (".bin", ".idx"):
                    _check(Path(item + ext).is_file(), "data.blend", f"not found: {item}{ext}")
    if cfg.checkpoint.load is not None:
        hint = (f" (the upcycled {cfg.upcycling.dense_base}: moe-recipe --config CONFIG "
                "writes it, as the scripts/slurm jobs do before training)"
                if cfg.upcycling.dense_base else "")
        _check(Path(cfg.checkpoint.load).exists(), "checkpoint.load",
               f"not found: {cfg.checkpoint.load}{hint}")
    for field, path in (("checkpoint.save", cfg.checkpoint.save),
                        ("logging.output_dir", cfg.logging.output_dir)):
        if path is not None:
            _check_writable_dir(field, Path(path))


def _check_writable_dir(field: str, path: Path) -> None:
    """A directory the run will write: refused now if it is a file, lies under a file, or
    cannot be written, rather than after the model is built. Creates nothing: the probe is an
    anonymous temporary file in the directory itself, or else in its nearest existing parent
    (where the run would create it)."""
    _check(not path.exists() or path.is_dir(), field, f"{path} is a file, not a directory")
    base = path
    while not base.exists() and base != base.parent:
        base = base.parent
    _check(base.is_dir(), field, f"{path} lies under {base}, which is a file")
    try:
        with tempfile.TemporaryFile(dir=base):  # unlinked from the start: nothing left behind
            pass
    except OSError as e:
        raise ConfigError(f"{field}: {path} cannot be written ({base}: {e.strerror or e})"
                          ) from None
