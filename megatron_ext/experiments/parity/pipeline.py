"""The whole-run parity against the paper's stack: one Drop-Upcycled Mixtral trained by ours
(``pretrain_moe.py``) and by the paper's loop (``reference``), on the same token stream.

Stages, each output under ``--output``:
1. ``dense/``: a dense Llama with the run's shape, transformers' own random init (seeded);
2. ``moe-hf/``: Drop-Upcycling of it with the config's ``upcycling`` section (HF Mixtral; theirs
   loads it), ``moe-mcore/``: that converted to our format (ours loads it); both by the code
   behind ``moe-upcycle`` and ``moe-hf-to-mcore``, validated by logits;
3. ``ours/``: ``pretrain_moe.py`` with ``checkpoint.load = moe-mcore``, one metrics record per
   step (loss, aux_loss, grad_norm, lr, per-layer expert load);
4. theirs: ``reference.ReferenceTrainer`` on ``moe-hf``, fed the micro-batches our run read:
   the dataset is opened from our run's saved config, so megatron loads the sample, document
   and shuffle indices our run built and cached (refused if it would build new ones), and our
   ``MicroBatches`` slices each step's global batch in the order the trainer did;
5. optionally (``floor``) ``ours-ulp/``: ours again from the same checkpoint with every weight
   moved by one ulp, the run-to-run spread that rounding alone produces.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from megatron_ext.config.derived import derive, moe_layer_pattern
from megatron_ext.config.loader import ConfigError, load_config
from megatron_ext.config.schema import Config
from megatron_ext.config.validate import validate
from megatron_ext.conversion.hf_io import HFCheckpoint
from megatron_ext.conversion.keymaps import hf_config_for
from megatron_ext.conversion.mcore_io import arch_from_config
from megatron_ext.errors import UserError
from megatron_ext.experiments.parity.reference import ReferenceRecipe, ReferenceTrainer
from megatron_ext.experiments.runner import run_logged
from megatron_ext.training.optim import clip_threshold

# The CPU run: a Mixtral-shaped MoE small enough for 200 steps of both stacks on 2 cores, on the
# demo corpus, with the paper config's objective and optimizer settings. 8 micro-batches of 4
# sequences per step: the accumulation steps of the paper's 8x152M run (grad_divisor 8). A
# larger LR than the paper's, to move in 200 steps, and a clip threshold (0.075 x 8 = 0.6 in
# mean-gradient units) that clips about half of the steps, so that clipping is compared too.
TINY = ("model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_kv_heads=2", "model.ffn_hidden_size=128", "model.vocab_size=4096",
        "model.max_position_embeddings=64", "data.seq_length=64", "data.mock=false",
        "data.demo_corpus=true", "data.blend=[]", "data.tokenizer=null",
        "train.micro_batch_size=4", "train.global_batch_size=32", "optimizer.lr=2e-3",
        "optimizer.min_lr=2e-4", "optimizer.clip_grad=0.075", "schedule.warmup_steps=20")


class ParityError(UserError, ValueError):
    """The configuration cannot be run by the reference loop, or a stage failed."""


@dataclass
class ParityRun:
    config: Path
    overrides: list[str]
    output: Path
    steps: int
    tiny: bool = True
    device: str = "cpu"
    dtype: str = "fp32"
    seed: int = 1234
    floor: bool = True
    validate: bool = True  # the conversions' logit checks


def run_config(run: ParityRun) -> tuple[Config, list[str]]:
    """The training config of ours (and the overrides that make it), checked."""
    sets = [*(TINY if run.tiny else ()), *run.overrides,
            f"train.train_steps={run.steps}", "train.train_tokens=null", "train.log_interval=1",
            "train.eval_interval=0", "checkpoint.save=null", "parallel.world_size=1",
            "parallel.expert=1", "logging.wandb.mode=disabled",
            f"train.precision={run.dtype}", f"train.seed={run.seed}"]
    try:
        cfg = load_config(run.config, sets)
        if cfg.schedule.warmup_steps >= run.steps:  # the paper's 2000 in a short check
            sets.append(f"schedule.warmup_steps={max(1, run.steps // 10)}")
            cfg = load_config(run.config, sets)
        validate(cfg, world_size=1)
    except ConfigError as e:
        raise ParityError(f"{run.config}: {e}") from None
    _check_representable(cfg)
    return cfg, sets


def _check_representable(cfg: Config) -> None:
    """What transformers' Mixtral (and the paper's loop) can train."""
    m, moe, par = cfg.model, cfg.moe, cfg.parallel
    problems = [
        (moe.num_experts == 0, "moe.num_experts is 0 (a dense model)"),
        (not all(moe_layer_pattern(m, moe)), "moe.layer_freq: Mixtral has MoE in every layer"),
        (moe.capacity_factor is not None, "moe.capacity_factor: Mixtral drops no tokens"),
        (moe.top_k == 1, "moe.top_k=1: megatron's top-1 is Switch's gate, Mixtral's is not"),
        (moe.z_loss_coeff is not None, "moe.z_loss_coeff: the paper's stack has no z-loss"),
        (par.tensor * par.pipeline != 1, "tensor/pipeline parallelism: one process only"),
        (m.vocab_size % m.vocab_multiple != 0,
         "model.vocab_size must be a multiple of vocab_multiple (no padded logits)"),
    ]
    for bad, why in problems:
        if bad:
            raise ParityError(f"the reference loop cannot run this config: {why}")


def recipe(cfg: Config) -> ReferenceRecipe:
    o, s = cfg.optimizer, cfg.schedule
    return ReferenceRecipe(
        lr=o.lr, min_lr=o.min_lr, warmup_steps=s.warmup_steps,
        decay_steps=s.decay_steps or cfg.train.train_steps, weight_decay=o.weight_decay,
        betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, clip=o.clip_grad,
        grad_divisor=o.grad_divisor)


def _cli(argv: list[str], log: Path, what: str) -> None:
    code, line = run_logged(argv, log)
    if code != 0:
        raise ParityError(f"{what} failed (exit {code}): {line} (log: {log})")


def make_dense(cfg: Config, out: Path, seed: int) -> None:
    """A dense Llama of ``cfg``'s shape, randomly initialized by transformers (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM  # why inside: import time

    arch = arch_from_config(cfg)
    dense = arch.__class__(**{**asdict(arch), "num_experts": 0, "moe_layers": frozenset()})
    hf = hf_config_for(dense, rms_norm_eps=cfg.model.norm_epsilon,
                       rope_theta=cfg.model.rotary_base,
                       max_position_embeddings=cfg.model.max_position_embeddings,
                       dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**hf))
    model.save_pretrained(out, safe_serialization=True)


def make_checkpoints(run: ParityRun, cfg: Config) -> None:
    """dense/ -> moe-hf/ (Drop-Upcycling, the config's upcycling section) -> moe-mcore/, each
    made only if missing; with ``floor`` also the one-ulp copies. Library calls in this process
    (the CLIs' code), validated by logits unless ``run.validate`` is off."""
    # why inside: both import megatron-core and transformers (seconds)
    from megatron_ext.conversion.convert import hf_to_mcore_checkpoint
    from megatron_ext.upcycling.convert import upcycle_checkpoint
    from megatron_ext.upcycling.spec import UpcycleSpec

    out, u = run.output, cfg.upcycling
    if not (out / "dense/config.json").is_file():
        make_dense(cfg, out / "dense", run.seed)
    if not (out / "moe-hf/config.json").is_file():
        spec = UpcycleSpec(method="drop", ratio=u.ratio, num_experts=cfg.moe.num_experts,
                           top_k=cfg.moe.top_k, seed=u.seed, index_sharing=u.index_sharing,
                           router_init=u.router_init)
        upcycle_checkpoint(out / "dense", out / "moe-hf", spec, output_format="hf",
                           overwrite=True, validate=run.validate)
    pairs = [("moe-hf", "moe-mcore")] + ([("moe-hf-ulp", "moe-mcore-ulp")] if run.floor else [])
    if run.floor and not (out / "moe-hf-ulp/config.json").is_file():
        nudge_one_ulp(out / "moe-hf", out / "moe-hf-ulp")
    for hf, mcore in pairs:
        if not (out / mcore / "latest").is_file():
            hf_to_mcore_checkpoint(out / hf, out / mcore, overwrite=True, validate=run.validate)


def nudge_one_ulp(src: Path, dst: Path) -> None:
    """A copy of an HF checkpoint with every floating-point weight one ulp larger."""
    from safetensors.torch import save_file  # why inside: only the floor run needs it

    ckpt = HFCheckpoint(src)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors = {k: torch.nextafter(t, torch.full_like(t, math.inf)) if t.is_floating_point()
               else t for k, t in ((k, ckpt.get(k)) for k in ckpt.keys())}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tmp.rename(dst)


def train_ours(run: ParityRun, config_sets: list[str], ckpt: Path, out_dir: Path) -> list[dict]:
    """Our run (reused when a finished one with the same command is there)."""
    argv = ["-m", "megatron_ext.cli.pretrain", "--config", str(run.config),
            *[x for s in config_sets for x in ("--set", s)],
            "--set", f"checkpoint.load={ckpt}", "--set", f"logging.output_dir={out_dir}"]
    done = out_dir / "command.json"
    if not done.is_file() or json.loads(done.read_text()) != argv:
        shutil.rmtree(out_dir, ignore_errors=True)
        _cli(argv, run.output / f"logs/{out_dir.name}.log", f"training ({out_dir.name})")
        done.write_text(json.dumps(argv) + "\n")
    return read_train(out_dir)


def read_train(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "train"]


def train_theirs(run: ParityRun, cfg_path: Path, device: str) -> tuple[list[dict], list]:
    """The reference loop over the micro-batches of our run (its saved config)."""
    cfg = load_config(cfg_path, [])
    dtype = torch.bfloat16 if run.dtype == "bf16" else torch.float32
    trainer = ReferenceTrainer(run.output / "moe-hf", recipe(cfg), device, dtype)
    records = []
    for step, batches in enumerate(our_micro_batches(cfg, run.steps)):
        records.append(asdict(trainer.step(batches)))
        if (step + 1) % 20 == 0:
            print(f"  | theirs: step {step + 1}/{run.steps} loss {records[-1]['loss']:.4f}",
                  flush=True)
    return records, [load.tolist() for load in trainer.last_load]


def our_micro_batches(cfg: Config, steps: int):
    """Each step's micro-batches in our trainer's order, from the dataset indices our run
    cached (a missing cache is an error: rebuilding could re-derive a different order)."""
    # why inside: both import megatron-core (seconds); the parity's other stages do not need it
    from megatron_ext.training.batches import MicroBatches
    from megatron_ext.training.setup import build_datasets

    before = _index_files(cfg)
    train = build_datasets(cfg, replace(derive(cfg), total_steps=steps)).train
    hashes = _description_hashes(train)
    used = {f: t for f, t in _index_files(cfg).items() if any(h in Path(f).name for h in hashes)}
    if not used or any(before.get(f) != t for f, t in used.items()):
        raise ParityError("the dataset indices of our run were not found in their cache (or "
                          "were rebuilt): the reference could read another order")
    tr = cfg.train
    micro = MicroBatches(train, tr.global_batch_size, tr.micro_batch_size, 1, 0, "cpu")
    for step in range(steps):
        yield list(micro.step(step * tr.global_batch_size))


def _description_hashes(dataset) -> set[str]:
    """megatron's cache keys of a dataset and of the datasets a blend draws from."""
    out = {dataset.unique_description_hash}
    for sub in getattr(dataset, "datasets", ()):
        out |= _description_hashes(sub)
    return out


def _index_files(cfg: Config) -> dict[str, int]:
    """The cached dataset index files (path -> mtime) where this config's run keeps them."""
    from megatron_ext.data.demo import ensure_demo_data  # why inside: cheap, but data-only

    d = cfg.data
    if d.cache_dir:
        roots = [Path(d.cache_dir)]
    elif d.demo_corpus:
        roots = [Path(ensure_demo_data()[0]).parent / "index-cache"]
    else:  # megatron's default: PREFIX's directory /cache
        roots = [Path(x).parent / "cache" for x in d.blend if isinstance(x, str)]
    return {str(f): f.stat().st_mtime_ns for root in roots if root.is_dir()
            for f in sorted(root.rglob("*.npy"))}


def run_parity(run: ParityRun) -> dict:
    """Every stage (finished ones are reused), then the comparison; returns its result."""
    from megatron_ext.experiments.parity import report  # why inside: matplotlib import time

    if run.dtype != "fp32" and not run.floor:
        raise ParityError("--dtype bf16 needs the 1-ulp run (drop --no-floor): in bf16 the runs "
                          "differ from the first step and the tolerance is relative to it")
    cfg, sets = run_config(run)
    run.output.mkdir(parents=True, exist_ok=True)
    make_checkpoints(run, cfg)
    ours = train_ours(run, sets, run.output / "moe-mcore", run.output / "ours")
    floor = (train_ours(run, sets, run.output / "moe-mcore-ulp", run.output / "ours-ulp")
             if run.floor else None)
    theirs, load = train_theirs(run, run.output / "ours/config.yaml", run.device)
    result = report.compare(ours, theirs, floor, load, fp32=run.dtype == "fp32",
                            clip=clip_threshold(cfg))
    title = (f"{run.config.name}{' (tiny CPU shape)' if run.tiny else ''}, {run.dtype} on "
             f"{run.device}, {run.steps} steps: ours vs the paper's stack")
    report.write(run.output, ours, theirs, floor, result, title)
    return result
