"""The comparison as a list of stages: dense base -> initialization -> training -> evaluation ->
routing, one per method; each stage an exact command of one of our CLIs (``python -m`` a module
of ``megatron_ext.cli``) and the outputs that show it finished (``runner`` runs and checks them).

Every training run gets the same config, ``--set`` overrides, seed and step count, so data order,
schedule and token budget are identical across methods; only ``checkpoint.load`` differs.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from megatron_ext.config.fields import short_repr
from megatron_ext.config.loader import ConfigError, load_config, read_config_text
from megatron_ext.config.schema import Config
from megatron_ext.config.validate import planned_world_size, validate
from megatron_ext.data.demo import CORPUS_DIR, corpus_files
from megatron_ext.errors import UserError, one_line
from megatron_ext.platform.run_files import run_inputs

# method name -> needs a ratio (drop, noise). btx (Branch-Train-MiX) has its experts from the dense
# base and from one branch of it per demo domain, each trained further on that domain alone.
KINDS = {"scratch": False, "naive": False, "noise": True, "drop": True, "btx": False}
# The stages' entry points, run as ``python -m MODULE``: the package's, never a repository path.
PRETRAIN, UPCYCLE = "megatron_ext.cli.pretrain", "megatron_ext.cli.upcycle"
ROUTING, LM_EVAL = "megatron_ext.cli.routing", "megatron_ext.cli.lm_eval"
# The scripts that older versions ran by path: a stage recorded with one is the same command.
LEGACY_SCRIPTS = {"pretrain_moe.py": PRETRAIN, "tools/convert/upcycle.py": UPCYCLE,
                  "tools/analysis/routing.py": ROUTING, "tools/eval/lm_eval.py": LM_EVAL}
FINGERPRINT_FILE = "experiment.json"


class ExperimentError(UserError, ValueError):
    """A bad comparison request (method, dense base, output dir); one line, exit 2."""


def checked_config(path: Path, overrides: list[str], procs: int = 1) -> Config:
    """The config as pretrain_moe.py loads and checks it when launched as ``procs`` processes
    (1: the smallest world its layout allows); ConfigError: one line."""
    cfg = load_config(path, overrides)
    p = cfg.parallel
    validate(cfg, world_size=planned_world_size(
        cfg, procs if procs > 1 else p.tensor * p.pipeline * p.expert))
    return cfg


@dataclass(frozen=True)
class Method:
    """One initialization, as given on the command line (``drop:0.5``)."""

    kind: str
    ratio: float | None = None

    @property
    def label(self) -> str:
        return self.kind if self.ratio is None else f"{self.kind}:{self.ratio:g}"

    @property
    def slug(self) -> str:  # a directory name
        return self.label.replace(":", "_r")


MAX_METHODS = 64  # each one is a training run


def parse_methods(text: str) -> list[Method]:
    """``scratch,naive,noise:0.5,drop:0.5,drop:1.0`` -> Methods; ExperimentError names a bad one."""
    methods: list[Method] = []
    items = [s.strip() for s in text.split(",", MAX_METHODS)]
    if len(items) > MAX_METHODS:
        raise ExperimentError(f"--methods: more than {MAX_METHODS} methods")
    for item in items:
        kind, _, ratio = item.partition(":")
        if kind not in KINDS:
            raise ExperimentError(f"--methods: unknown method {short_repr(item)} (use "
                                  f"{', '.join(KINDS)}; drop and noise take a ratio, e.g. "
                                  "drop:0.5)")
        if KINDS[kind] != bool(ratio):
            raise ExperimentError(f"--methods: {short_repr(item)}: " + (
                f"{kind} needs a ratio in [0, 1], e.g. {kind}:0.5" if KINDS[kind]
                else f"{kind} takes no ratio"))
        method = Method(kind, _ratio(item, ratio) if ratio else None)
        if method in methods:
            raise ExperimentError(f"--methods: {short_repr(item)} is given twice")
        methods.append(method)
    return methods


def _ratio(item: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise ExperimentError(f"--methods: {short_repr(item)}: the ratio must be a number in "
                              "[0, 1]")
    return value


@dataclass
class Stage:
    """One step of the comparison: ``argv`` (the module, then its arguments: run as
    ``python -m *argv`` from the repository root) is finished when ``done`` (see runner.DONE)
    holds for ``output``."""

    name: str
    argv: list[str]
    done: str  # "checkpoint" | "json"
    output: Path
    steps: int = 0  # training steps the checkpoint must have reached (checkpoint stages)
    tokens: int = 0
    needs: tuple[str, ...] = ()  # stages whose outputs this one reads
    workdir: Path | None = None  # removed before a rerun forced by a redone ``needs`` stage
    procs: int = 1  # > 1: a training stage launched by torchrun on this node

    @property
    def command(self) -> list[str]:
        """The exact command line of the local backend (``python`` = this interpreter)."""
        if self.procs == 1:
            return ["python", "-m", *self.argv]
        return ["python", "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={self.procs}", "-m", *self.argv]


def same_command(recorded: list[str] | None, command: list[str]) -> bool:
    """Whether a stage's recorded command (None: none recorded) is ``command``, also when an
    older version recorded it with the script path of its entry point (``LEGACY_SCRIPTS``):
    upgrading must not redo a finished training."""
    if recorded is None or recorded == command:
        return True
    for i, arg in enumerate(recorded):
        if arg in LEGACY_SCRIPTS:
            return [*recorded[:i], "-m", LEGACY_SCRIPTS[arg], *recorded[i + 1:]] == command
    return False


@dataclass
class Experiment:
    config: Path
    overrides: list[str]
    methods: list[Method]
    tokens: int
    output: Path
    dense: Path | None = None  # given base; else trained for dense_tokens
    dense_tokens: int = 0
    tasks: str | None = None
    eval_limit: float | None = None  # lm_eval.py --limit: examples per task (a fraction if < 1)
    routing_tokens: int = 20_000
    btx_tokens: int | None = None  # per domain branch; None = a quarter of ``tokens``
    procs: int = 1  # processes per training stage (torchrun on this node: its GPUs, or CPU)
    cfg: Config = field(init=False)

    def __post_init__(self) -> None:
        try:
            self.cfg = checked_config(self.config, self.overrides, self.procs)
        except ConfigError as e:
            raise ExperimentError(f"--config {self.config}: {one_line(e)}") from None
        if self.cfg.moe.num_experts == 0:
            raise ExperimentError(f"--config {self.config}: moe.num_experts is 0; give the "
                                  "config of the MoE runs (the dense base is derived from it)")
        if any(m.kind == "btx" for m in self.methods):
            self._check_btx()

    def _check_btx(self) -> None:
        sources = 1 + len(btx_domains())  # the base and one branch per domain
        if not self.cfg.data.demo_corpus:
            raise ExperimentError("--methods btx: its branches train on the demo corpus "
                                  "languages; the config needs data.demo_corpus: true")
        if self.cfg.moe.num_experts % sources:
            raise ExperimentError(f"--methods btx: moe.num_experts {self.cfg.moe.num_experts} "
                                  f"is not divisible by its {sources} source models (the dense "
                                  f"base and a branch per domain: {', '.join(btx_domains())})")
        if self.dense is not None and not (self.dense / "latest").is_file() \
                and not (self.dense / "meta.json").is_file():
            raise ExperimentError(f"--methods btx: its branches continue training --dense "
                                  f"{self.dense}, which must be one of our checkpoints (convert "
                                  "an HF dir with moe-hf-to-mcore)")

    def inputs(self) -> list[tuple[str, str | Path | None]]:
        """Everything the experiment reads, as (flag, path) pairs for ``platform.fs.check_io``:
        what its trainings read (config file, tokenizer, data, checkpoint.load), the dense base
        and the demo corpus its held-out texts come from. --output (which --overwrite deletes)
        must be disjoint from each."""
        found = [*run_inputs(self.cfg, str(self.config)), ("--dense", self.dense)]
        if self.cfg.data.demo_corpus:
            found.append(("the demo corpus", CORPUS_DIR))
        return found

    def cli_args(self) -> list[str]:
        """The arguments of compare_inits.py that make this experiment (a SLURM job re-runs
        the tool with them)."""
        base = (["--dense", str(self.dense)] if self.dense
                else ["--train-dense", str(self.dense_tokens)])
        return ["--config", str(self.config), *_sets(*self.overrides),
                "--methods", ",".join(m.label for m in self.methods), "--tokens", str(self.tokens),
                *base, *(["--tasks", self.tasks] if self.tasks else []),
                *(["--eval-limit", f"{self.eval_limit:g}"] if self.eval_limit else []),
                *(["--btx-tokens", str(self.btx_tokens)] if self.btx_tokens else []),
                "--routing-tokens", str(self.routing_tokens), "--output", str(self.output),
                *(["--nproc-per-node", str(self.procs)] if self.procs > 1 else [])]

    @property
    def branch_tokens(self) -> int:
        return self.btx_tokens or max(1, self.tokens // 4)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.global_batch_size * self.cfg.data.seq_length

    def steps(self, tokens: int) -> int:
        return max(1, math.ceil(tokens / self.tokens_per_step))

    def fingerprint(self) -> dict:
        """What makes two runs the same experiment (stored in DIR/experiment.json)."""
        identity = {"config": read_config_text(self.config), "overrides": self.overrides,
                    "methods": [m.label for m in self.methods], "tokens": self.tokens,
                    "dense": str(self.dense) if self.dense else None,
                    "dense_tokens": self.dense_tokens, "tasks": self.tasks,
                    "routing_tokens": self.routing_tokens}
        # Options added later count only when used: an older experiment keeps its fingerprint.
        if self.eval_limit:
            identity["eval_limit"] = float(self.eval_limit)
        if any(m.kind == "btx" for m in self.methods):
            identity["btx_tokens"] = self.branch_tokens
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        return {"fingerprint": digest[:16], **identity}


def _domain(corpus_file: str) -> str:  # code_python.txt -> code
    return Path(corpus_file).name.split("_")[0].split(".")[0]


def btx_domains() -> list[str]:
    """The demo corpus languages (code, en, ja): one BTX branch each."""
    return [_domain(f) for f in corpus_files(CORPUS_DIR)]


def heldout_paths(exp: Experiment) -> dict[str, Path]:
    """Domain label (en, ja, code) -> DIR/heldout/<file>, the routing stages' text."""
    return {_domain(f): exp.output / "heldout" / Path(f).name for f in corpus_files(CORPUS_DIR)}


def heldout_text(text: str, split: str) -> str:
    """The end of a corpus file that ``data.split`` holds out of training: its documents are
    split in file order, so the last (validation + test) share is never trained on. 90% of that
    share, from a line start, keeps clear of the boundary (documents differ in length)."""
    weights = [float(w) for w in split.replace("/", ",").split(",")]
    share = 0.9 * sum(weights[1:]) / sum(weights)
    start = text.find("\n", int(len(text) * (1 - share))) + 1
    return text[start:] if 0 < start < len(text) else ""


def check_stage_configs(exp: Experiment, stages: list[Stage]) -> None:
    """Each training stage's own config (the experiment's with the stage's overrides), checked
    before the first stage runs: a branch too short for the warm-up fails now, not after the
    dense base has trained. ExperimentError names the stage."""
    for stage in stages:
        if stage.argv[0] != PRETRAIN:
            continue
        sets = [stage.argv[i + 1] for i, arg in enumerate(stage.argv) if arg == "--set"]
        try:
            checked_config(exp.config, sets, exp.procs)
        except ConfigError as e:
            raise ExperimentError(f"stage {stage.name}: {one_line(e)}") from None


def _sets(*pairs: str) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


def build_stages(exp: Experiment) -> list[Stage]:
    """Every stage of ``exp``, in order (dense first, then each method's chain)."""
    out, cfg_args = exp.output, ["--config", str(exp.config), *_sets(*exp.overrides)]
    stages, dense, needs = [], exp.dense, ()
    if dense is None:
        needs = ("dense",)
        steps, dense = exp.steps(exp.dense_tokens), out / "dense" / "ckpt"
        stages.append(Stage("dense", [PRETRAIN, *cfg_args, *_sets(
            "moe.num_experts=0", f"train.train_steps={steps}", f"checkpoint.save={dense}",
            f"logging.output_dir={out / 'dense' / 'run'}")], "checkpoint", dense, steps,
            steps * exp.tokens_per_step, procs=exp.procs))
    steps = exp.steps(exp.tokens)
    for m in exp.methods:
        if m.kind == "btx":
            stages.extend(_branch_stages(exp, dense, cfg_args, needs))
        stages.extend(_method_stages(exp, m, dense, cfg_args, steps, needs))
    return stages


def _branch_stages(exp: Experiment, dense: Path, cfg_args: list[str],
                   needs: tuple[str, ...]) -> list[Stage]:
    """BTX's branches: the dense base trained further on one demo domain each, the same
    config and schedule as the base (its weights loaded, a fresh optimizer)."""
    stages, steps = [], exp.steps(exp.branch_tokens)
    for domain in btx_domains():
        work = exp.output / "branch" / domain
        stages.append(Stage(f"branch/{domain}", [PRETRAIN, *cfg_args, *_sets(
            "moe.num_experts=0", f"data.blend=[demo:{domain}]", f"train.train_steps={steps}",
            f"checkpoint.load={dense}", f"checkpoint.save={work / 'ckpt'}",
            f"logging.output_dir={work / 'run'}")], "checkpoint", work / "ckpt", steps,
            steps * exp.tokens_per_step, needs, workdir=work, procs=exp.procs))
    return stages


def _method_stages(exp: Experiment, m: Method, dense: Path, cfg_args: list[str],
                   steps: int, needs: tuple[str, ...]) -> list[Stage]:
    out, train = exp.output, exp.output / "train" / m.slug
    ckpt, stages, load = train / "ckpt", [], []
    if m.kind == "scratch":  # the trainer's own random init: no upcycling, no dense base
        needs = ()
    else:
        init = out / "init" / m.slug
        recipe = [f"upcycling.method={m.kind}"] + (
            [f"upcycling.ratio={m.ratio}"] if m.ratio is not None else [])
        branches: list[str] = []
        if m.kind == "btx":  # source 0 is the base, then the branches in domain order
            branches = ["--btx-sources", *(str(out / "branch" / d / "ckpt")
                                           for d in btx_domains())]
            needs = needs + tuple(f"branch/{d}" for d in btx_domains())
        stages.append(Stage(f"init/{m.label}", [
            UPCYCLE, *cfg_args, *_sets(*recipe), "--input", str(dense), *branches,
            "--output", str(init), "--output-format", "mcore", "--overwrite"], "checkpoint",
            init, needs=needs))
        load, needs = [f"checkpoint.load={init}"], (f"init/{m.label}",)
    stages.append(Stage(f"train/{m.label}", [PRETRAIN, *cfg_args, *_sets(
        f"train.train_steps={steps}", f"checkpoint.save={ckpt}",
        f"logging.output_dir={train / 'run'}", *load)], "checkpoint", ckpt, steps,
        steps * exp.tokens_per_step, needs, workdir=train, procs=exp.procs))
    needs = (f"train/{m.label}",)
    if exp.tasks:
        stages.append(Stage(f"eval/{m.label}", [
            LM_EVAL, "--checkpoint", str(ckpt), "--tasks", exp.tasks,
            *(["--limit", f"{exp.eval_limit:g}"] if exp.eval_limit else []),
            "--output", str(out / "eval" / m.slug)], "json",
            out / "eval" / m.slug / "results.json", needs=needs))
    texts = [f"{label}={path}" for label, path in heldout_paths(exp).items()]
    stages.append(Stage(f"routing/{m.label}", [
        ROUTING, "--checkpoint", str(ckpt), "--text", *texts, "--max-tokens",
        str(exp.routing_tokens), "--output", str(out / "routing" / m.slug)], "json",
        out / "routing" / m.slug / "routing.json", needs=needs))
    return stages
