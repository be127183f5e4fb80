"""The paper recipe: a dense base, upcycled by the config's ``upcycling`` section into
``checkpoint.load``, then the training run that starts from it (``moe-recipe``, which the
scripts/slurm jobs run before training).

* ``resolve_dense_base``: ``upcycling.dense_base`` names a local directory (an HF Llama or one
  of our checkpoints) or a Hugging Face repo id ``org/name[@revision]``, fetched through
  ``huggingface_hub.snapshot_download``: its cache, ``HF_HOME`` and ``HF_HUB_OFFLINE`` work as
  everywhere else in the HF stack (on a login node it downloads; an offline job finds the copy).
* ``plan``: every problem at once (config, data prefixes, tokenizer vocabulary against the
  model's, the dense base's shape against the config, a ``checkpoint.load`` holding something
  else), and the one step left to do:

  - ``resume``: ``checkpoint.save`` already holds a verified checkpoint; training resumes it and
    needs no initial weights (a requeued job lands here).
  - ``done``: ``checkpoint.load`` holds this dense base upcycled with this config's recipe
    (its ``upcycling.json``) and verifies: nothing to redo.
  - ``upcycle``: nothing there yet. The upcycler stages its output and renames it at the end,
    so an interrupted upcycle leaves nothing and simply runs again.
  - ``none``: the config names no dense base.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from megatron_ext.config.loader import ConfigError
from megatron_ext.config.schema import Config
from megatron_ext.config.validate import check_paths, planned_world_size, validate
from megatron_ext.data.tokenizer import load_tokenizer
from megatron_ext.errors import UserError, one_line

# org/name or org/name@revision, as the Hub spells repo ids (a local path wins when it exists).
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
# What upcycling reads from a Hub repo: weights, configs and the tokenizer it copies along.
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
             "tokenizer*", "special_tokens_map.json", "*.model"]


class RecipeError(UserError):
    """The dense base cannot be had, or the recipe's output is not what the config asks."""


def resolve_dense_base(name: str) -> Path:
    """The directory ``upcycling.dense_base`` names (see the module docstring)."""
    path = Path(name).expanduser()
    if path.exists() or not REPO_ID.match(name):
        if not path.is_dir():
            raise RecipeError(f"upcycling.dense_base: {name} is not a directory, nor a Hugging "
                              "Face repo id (org/name[@revision])")
        return path
    # why inside: huggingface_hub reads HF_HOME / HF_HUB_OFFLINE when first imported
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, _, revision = name.partition("@")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None,
                                      allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError:
        raise RecipeError(f"upcycling.dense_base: {name} is not in the Hugging Face cache "
                          "(HF_HOME) and cannot be downloaded here (offline: HF_HUB_OFFLINE, or "
                          "no network); fetch it once where there is a network, e.g. moe-recipe "
                          "--check on the login node") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise RecipeError(f"upcycling.dense_base: {name}: {one_line(e)}") from None


@dataclass
class Plan:
    step: str  # none | resume | done | upcycle (module docstring)
    note: str
    problems: list[str] = field(default_factory=list)
    dense: Path | None = None  # the resolved dense base, when the step is upcycle


def plan(cfg: Config) -> Plan:
    """What the recipe would do for ``cfg``, with every problem found on the way."""
    problems = [*_config_problems(cfg), *data_problems(cfg)]
    u, load = cfg.upcycling, cfg.checkpoint.load
    if u.dense_base is None or load is None:  # (dense_base without load: a config problem)
        return Plan("none", "no upcycling.dense_base: nothing to upcycle", problems)
    lib = _torch_side()
    resume = _resumable(cfg.checkpoint.save)
    if resume is not None:
        return Plan("resume", f"training resumes from {resume}: nothing to upcycle", problems)
    if Path(load).exists():
        problem = upcycled_problem(cfg)
        return Plan("done", f"{load} holds {u.dense_base} upcycled with this recipe "
                    f"({u.method}, ratio {u.ratio}, seed {u.seed}): skipping the upcycle",
                    problems + ([problem] if problem else []))
    dense = None
    try:
        dense = resolve_dense_base(u.dense_base)
        diffs = lib.shape_differences(cfg, lib.open_dense(dense).arch)
        if diffs:
            problems.append(f"upcycling.dense_base {u.dense_base} ({dense}) does not have the "
                            f"config's shape (config vs dense): {', '.join(diffs)}")
    except UserError as e:
        problems.append(str(e))
    return Plan("upcycle", f"upcycling {u.dense_base} ({dense}) into {load}: {u.method}, "
                f"ratio {u.ratio}, seed {u.seed}", problems, dense)


def _config_problems(cfg: Config) -> list[str]:
    """The config's own checks (the first failing one) and its output directories."""
    found = []
    p = cfg.parallel
    try:
        validate(cfg, world_size=planned_world_size(cfg, p.tensor * p.pipeline * p.expert))
    except ConfigError as e:
        found.append(str(e))
    probe = copy.deepcopy(cfg)  # the data and checkpoint.load are checked on their own
    probe.data.mock, probe.checkpoint.load = True, None
    try:
        check_paths(probe)
    except ConfigError as e:
        found.append(str(e))
    return found


def data_problems(cfg: Config) -> list[str]:
    """Every missing .bin/.idx of the blend and validation sets, a missing tokenizer, or one
    whose vocabulary is larger than the model's (its last ids would have no embedding row)."""
    d = cfg.data
    if d.mock or d.demo_corpus:
        return []
    sources = list(d.blend)
    for source in d.valid_sets.values():
        sources += source if isinstance(source, list) else [source]
    found = []
    for prefix in dict.fromkeys(x for x in sources if isinstance(x, str)):
        missing = [prefix + ext for ext in (".bin", ".idx") if not Path(prefix + ext).is_file()]
        if missing:
            found.append(f"data: missing {' and '.join(missing)}")
    if d.tokenizer is None:
        return found  # (a config problem already)
    if not Path(d.tokenizer).exists():
        return [*found, f"data.tokenizer: not found: {d.tokenizer}"]
    try:
        vocab = load_tokenizer(d.tokenizer).vocab_size
    except UserError as e:
        return [*found, f"data.tokenizer: {e}"]
    if vocab > cfg.model.vocab_size:
        found.append(f"data.tokenizer: {d.tokenizer} has {vocab} tokens, more than the model's "
                     f"vocabulary (model.vocab_size {cfg.model.vocab_size})")
    return found


def _torch_side() -> SimpleNamespace:
    """The checkpoint and upcycling functions the recipe uses, imported on first use: they
    import torch and megatron-core (~5 s of CPU), which every SLURM job start without a dense
    base (``plan``'s first return) does not need."""
    from megatron_ext.checkpoint.manifest import CheckpointError
    from megatron_ext.checkpoint.store import find_resumable
    from megatron_ext.upcycling.convert import INFO_FILE, open_dense, upcycle_checkpoint
    from megatron_ext.upcycling.from_config import shape_differences, spec_from_config

    return SimpleNamespace(
        CheckpointError=CheckpointError, find_resumable=find_resumable, INFO_FILE=INFO_FILE,
        open_dense=open_dense, upcycle_checkpoint=upcycle_checkpoint,
        shape_differences=shape_differences, spec_from_config=spec_from_config)


def _resumable(save: str | None) -> Path | None:
    lib = _torch_side()
    if save is None:
        return None
    try:
        return lib.find_resumable(save)[0]
    except lib.CheckpointError:
        return None  # damaged checkpoints only: training says so; the upcycled weights serve


def upcycled_problem(cfg: Config) -> str | None:
    """Why ``checkpoint.load`` is not this dense base upcycled with this config's recipe (None:
    it is, and it verifies)."""
    lib = _torch_side()
    load, u = Path(cfg.checkpoint.load), cfg.upcycling
    try:
        info = json.loads((load / lib.INFO_FILE).read_text())
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict):
        return (f"checkpoint.load {load} exists but has no {lib.INFO_FILE}: not an upcycled "
                "checkpoint; move it away (the recipe writes there) or drop upcycling.dense_base")
    want = {**lib.spec_from_config(cfg).describe(), "dense_base": u.dense_base}
    diffs = [f"{k} {info.get(k)!r} (config: {v!r})" for k, v in want.items() if info.get(k) != v]
    if diffs:
        return (f"checkpoint.load {load} was upcycled with another recipe: {', '.join(diffs)}; "
                "move it away to upcycle again, or restore the config")
    try:
        if lib.find_resumable(load)[0] is None:
            return f"checkpoint.load {load}: no checkpoint in it; move it away to upcycle again"
    except lib.CheckpointError as e:
        return f"checkpoint.load {e}; move it away to upcycle again"
    return None


def upcycle(cfg: Config, dense: Path, log=print) -> None:
    """Write ``dense`` upcycled with the config's recipe into ``checkpoint.load`` (megatron
    format), validated against the dense model; nothing is left there if anything fails."""
    lib = _torch_side()
    lib.upcycle_checkpoint(dense, Path(cfg.checkpoint.load), lib.spec_from_config(cfg),
                           output_format="mcore", validate=True, log=log, data=cfg.data,
                           record={"dense_base": cfg.upcycling.dense_base})
