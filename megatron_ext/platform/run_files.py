"""What a training run reads and writes, declared once and checked before anything is written.

A run reads its config file, the tokenizer, the data prefixes (``.bin``/``.idx``) of
``data.blend`` and ``data.valid_sets``, and ``checkpoint.load`` (with the iter dir its
``latest`` names). It writes ``logging.output_dir`` (resolved config, metrics, TensorBoard and
W&B files, a lock) and ``checkpoint.save`` (iter dirs, ``latest``, a lock; old checkpoints are
pruned there). ``check_run_io`` refuses, with one line, any output that is, contains or lies
inside an input (``platform.fs.check_io``: a run whose ``logging.output_dir`` is the checkpoint
it loads would write its ``config.yaml`` into it and damage it for good), and a symbolic link
where a run file goes (nothing is written through a link into a file elsewhere).
``experiments`` declares the same inputs for the comparison's output directory.
"""

from __future__ import annotations

from megatron_ext.config.derived import DEMO_PREFIX
from megatron_ext.config.loader import ConfigError
from megatron_ext.config.schema import Config
from megatron_ext.platform.fs import check_io, check_run_files

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
# Names a run creates in logging.output_dir and in checkpoint.save (besides iter dirs).
OUTPUT_DIR_FILES = (CONFIG_FILE, METRICS_FILE, "tensorboard", "wandb", "wandb_run_id", ".lock")
SAVE_DIR_FILES = ("latest", ".lock")


def _prefix_files(field: str, sources: object) -> list[tuple[str, str]]:
    """The ``.bin`` and ``.idx`` files of the dataset prefixes in a blend (weights skipped)."""
    items = sources if isinstance(sources, list) else [sources]
    # a demo corpus language (demo:en) names no files
    return [(field, f"{item}{ext}") for item in items
            if isinstance(item, str) and not item.startswith(DEMO_PREFIX)
            for ext in (".bin", ".idx")]


def run_inputs(cfg: Config, config_file: str | None) -> list[tuple[str, str | None]]:
    """(field, path) of everything a training run with ``cfg`` reads (None: not given)."""
    d = cfg.data
    inputs: list[tuple[str, str | None]] = [("--config", config_file),
                                            ("checkpoint.load", cfg.checkpoint.load),
                                            ("data.tokenizer", d.tokenizer)]
    if not d.mock:
        inputs += _prefix_files("data.blend", d.blend)
        for name, sources in d.valid_sets.items():
            inputs += _prefix_files(f"data.valid_sets.{name}", sources)
    return inputs


def check_run_io(cfg: Config, config_file: str | None) -> None:
    """ConfigError (one line) unless the run's outputs are disjoint from its inputs and no run
    file in its output directories is a symbolic link. Reads and creates nothing but names."""
    outputs = [("logging.output_dir", cfg.logging.output_dir),
               ("checkpoint.save", cfg.checkpoint.save)]
    inputs = run_inputs(cfg, config_file)
    check_io(outputs, inputs, error=ConfigError)
    # Index caches go beside the data by default: only the other inputs are off limits.
    check_io([("data.cache_dir", cfg.data.cache_dir)], inputs[:3], error=ConfigError)
    if cfg.logging.output_dir:
        check_run_files(cfg.logging.output_dir, OUTPUT_DIR_FILES, "logging.output_dir",
                     error=ConfigError)
    if cfg.checkpoint.save:
        check_run_files(cfg.checkpoint.save, SAVE_DIR_FILES, "checkpoint.save", error=ConfigError)
