"""Run lm-evaluation-harness tasks on one of our checkpoints or an HF directory; write the results.

The library side of ``moe-lm-eval`` (``megatron_ext.cli.lm_eval``):

* ``task_manager()``: lm-eval's tasks plus the repo's local ones (``tasks/``, shipped data, no
  network); ``check_tasks`` refuses an unknown name with the closest known ones;
* ``build_lm(path, ...)``: our ``MegatronLM`` for a checkpoint (root or ``iter_*``), lm-eval's own
  ``HFLM`` for an HF directory (fp32 on CPU, as our model);
* ``evaluate(lm, tasks, ...)`` -> lm-eval's results dict; ``write_results`` writes
  ``results.json`` (lm-eval's), ``results.md`` (its tables) and, with samples,
  ``samples/<task>.jsonl`` (every request and response), each file atomically.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import torch
from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable, make_table

from megatron_ext.data.errors import DataError
from megatron_ext.evaluation.lm_eval_model import MegatronLM
from megatron_ext.platform.fs import atomic_write, check_io, check_run_files

REPO = Path(__file__).resolve().parents[2]
LOCAL_TASKS = REPO / "tasks"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
RESULT_FILES = ("results.json", "results.md", "samples")


def task_manager(names: list[str] | None = None, include_path: str | Path = LOCAL_TASKS
                 ) -> TaskManager:
    """lm-eval's task index over ``include_path`` and, unless every one of ``names`` is found
    there, lm-eval's own ~15k tasks too (indexing those takes ~20 s)."""
    local = TaskManager(include_path=str(include_path), include_defaults=False)
    if names and not _unknown(local, names):
        return local
    return TaskManager(include_path=str(include_path))


def _unknown(manager: TaskManager, names: list[str]) -> list[str]:
    known = set(manager.all_tasks)
    return [n for n in names if n not in known and not manager.match_tasks([n])]


def check_tasks(manager: TaskManager, names: list[str]) -> list[str]:
    """``names`` if every one is a known task, group or tag; else one line naming the unknown
    ones and, for each, the closest known names."""
    if not names:
        raise DataError("no task given (--tasks a,b,...)")
    unknown = _unknown(manager, names)
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
            hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise DataError(f"unknown task {'; '.join(hints)}; local tasks are in {LOCAL_TASKS}, "
                        "all names: python -m lm_eval ls tasks")
    return names


def is_hf_dir(path: Path) -> bool:
    """An HF model directory (config.json, none of our checkpoint markers)."""
    ours = ("meta.json", "latest")
    return (path / "config.json").is_file() and not any((path / m).exists() for m in ours)


def build_lm(path: str | Path, batch_size: int, hf: bool = False,
             tokenizer: str | None = None) -> LM:
    """The lm-eval model for ``path``: ``HFLM`` if ``hf`` or an HF directory, else ours."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: checkpoint not found")
    if hf or is_hf_dir(path):
        return _hf_lm(path, batch_size, tokenizer)
    return MegatronLM.from_checkpoint(path, batch_size=batch_size, tokenizer=tokenizer)


def _hf_lm(path: Path, batch_size: int, tokenizer: str | None) -> LM:
    # why inside: transformers' model code is imported only when an HF model is evaluated
    from lm_eval.models.huggingface import HFLM

    if not (path / "config.json").is_file():
        raise DataError(f"{path}: not an HF model directory (no config.json)")
    if tokenizer is None and not any((path / f).is_file() for f in HF_TOKENIZER_FILES):
        raise DataError(f"{path}: no tokenizer files ({', '.join(HF_TOKENIZER_FILES)}); "
                        "pass --tokenizer")
    cuda = torch.cuda.is_available()
    return HFLM(pretrained=str(path), tokenizer=tokenizer, batch_size=batch_size,
                device="cuda" if cuda else "cpu", dtype="auto" if cuda else "float32")


def evaluate(lm: LM, tasks: list[str], manager: TaskManager, limit: float | None = None,
             num_fewshot: int | None = None, log_samples: bool = False,
             bootstrap_iters: int = 1000, seed: int = 1234) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on a built model; returns its results dict."""
    results = simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
        log_samples=log_samples, bootstrap_iters=bootstrap_iters, random_seed=seed,
        numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    if results is None:  # only non-zero ranks of a multi-process run get None
        raise DataError("lm-eval returned no results")
    return results


def markdown(results: dict[str, Any]) -> str:
    """lm-eval's results table (and its groups table when there are groups)."""
    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text


def check_output(out_dir: str | Path, checkpoint: str | Path, tokenizer: str | None,
                 lm: LM) -> None:
    """DataError (one line) unless ``out_dir`` is disjoint from everything the evaluation
    reads (the checkpoint, what its ``latest`` names, the tokenizer it uses, the local tasks;
    ``platform.fs.check_io``) and holds no symbolic link where a results file goes. Results
    written into a checkpoint would make it fail verification for good."""
    inputs = [("--checkpoint", checkpoint), ("--tokenizer", tokenizer),
              ("the local tasks", LOCAL_TASKS)]
    if isinstance(lm, MegatronLM):
        inputs.append(("the checkpoint's tokenizer", lm.tok.path))
    check_io([("--output", out_dir)], inputs, error=DataError)
    check_run_files(out_dir, RESULT_FILES, "--output", error=DataError)


def write_results(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write results.json, results.md and samples/<task>.jsonl; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = results.pop("samples", None) or {}
    written = [out_dir / "results.json", out_dir / "results.md"]
    atomic_write(written[0], json.dumps(results, indent=2, default=handle_non_serializable,
                                        ensure_ascii=False) + "\n")
    atomic_write(written[1], markdown(results))
    if samples:
        (out_dir / "samples").mkdir(exist_ok=True)
    for task, rows in samples.items():
        path = out_dir / "samples" / f"{task}.jsonl"
        atomic_write(path, "".join(json.dumps(r, default=handle_non_serializable,
                                              ensure_ascii=False) + "\n" for r in rows))
        written.append(path)
    return written
