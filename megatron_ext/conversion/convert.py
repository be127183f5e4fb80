"""HF (Llama / Mixtral / our mixed format) <-> our megatron-core checkpoints, directory to
directory: the library behind ``moe-hf-to-mcore`` and ``moe-mcore-to-hf`` (``megatron_ext.cli``).

Both directions stream through ``keymaps`` and stage their output beside the target; it is
renamed only after writing and validation succeed. Validation (on by default) runs the source
and the result on ``model.compare.probe_tokens`` (CPU, fp32): megatron via
``checkpoint.load_model`` and ``model.inference.logits``, transformers via ``hf_models``
(``load_moe`` for mixed models), and fails above ``rel_tolerance * max(1, max |source logit|)``.

Everything here runs in a single process (gloo world of 1); megatron is imported lazily.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from megatron_ext.config.schema import Config, DataConfig
from megatron_ext.conversion.hf_config import read_hf_config
from megatron_ext.conversion.hf_io import (
    TOKENIZER_FILES,
    HFCheckpoint,
    staged_dir,
    write_hf_checkpoint,
)
from megatron_ext.conversion.hf_models import hf_logits
from megatron_ext.conversion.hf_tokenizer import SPECIAL_IDS, generation_config, write_tokenizer
from megatron_ext.conversion.keymaps import (
    HF_EMBED,
    ConversionError,
    arch_from_hf_config,
    hf_shapes,
    hf_to_mcore,
    mcore_to_hf,
)
from megatron_ext.conversion.mcore_io import (  # no megatron import at module level
    MIXED_NOTE,
    config_from_hf,
    hf_config_from_mcore,
    hf_record,
    is_mixed,
    read_mcore_checkpoint,
    save_mcore_into,
    single_process,
)
from megatron_ext.data.errors import DataError
from megatron_ext.data.run_tokenizer import checkpoint_tokenizer
from megatron_ext.model.compare import ValidationError, ValidationReport, compare, probe_tokens
from megatron_ext.platform.fs import HF_RECORD, check_io, input_paths
from megatron_ext.platform.progress import Progress

DTYPE_CHOICES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}


# --- logits -----------------------------------------------------------------------------------
def mcore_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Our megatron model's logits (fp32 on CPU, EP = 1), cut to the tokenizer vocabulary."""
    # why inside: both import megatron-core (seconds), which HF-only conversions never need
    from megatron_ext.checkpoint.load_model import load_model
    from megatron_ext.model.inference import logits

    with single_process(None):
        cfg, model = load_model(path, expert_parallel=1)
        return logits(model, tokens)[..., : cfg.model.vocab_size]


def checkpoint_logits(path: Path, fmt: str, tokens: torch.Tensor) -> torch.Tensor:
    return hf_logits(path, tokens) if fmt == "hf" else mcore_logits(path, tokens)


def compare_logits(ref: tuple[Path, str], out: tuple[Path, str], vocab_size: int,
                   function_preserving: bool = True, rel_tolerance: float = 1e-4
                   ) -> ValidationReport:
    """Logits of ``out`` vs ``ref`` ((path, "hf" | "mcore") each) on the probe tokens; one model
    in memory at a time."""
    tokens = probe_tokens(vocab_size)
    expected = checkpoint_logits(*ref, tokens)
    got = checkpoint_logits(*out, tokens)
    return compare(expected, got, function_preserving, rel_tolerance)


def summary(report: ValidationReport) -> str:
    check = (f"<= {report.tolerance:.2e} required" if report.tolerance is not None
             else "reported only")
    return (f"validation: max |logit diff| = {report.max_abs_diff:.3e} ({check}); max |source "
            f"logit| = {report.max_abs_logit:.3f}; finite = {report.finite}; "
            f"{'PASS' if report.passed else 'FAIL'}")


def _check(report: ValidationReport, log: Callable[[str], None]) -> ValidationReport:
    log(summary(report))
    if not report.passed:
        raise ValidationError(summary(report))
    return report


def checkpoint_inputs(flag: str, path: Path) -> list[tuple[str, Path]]:
    """What reading the checkpoint at ``path`` touches (``platform.fs.input_paths``)."""
    return input_paths(flag, path)


def preflight(inputs: list[tuple[str, Path]], output: Path, overwrite: bool) -> Path:
    """Checks made before any slow work, for every converter: inputs present, the output
    disjoint from every input (``platform.fs.check_io``, ``--overwrite`` or not), the output
    free unless ``overwrite``. ``inputs``: (flag, path) pairs, the primary input first."""
    for _, path in inputs:
        if not Path(path).exists():
            raise ConversionError(f"{path}: input does not exist")
    check_io([("--output", output)], inputs, error=ConversionError)
    output = Path(output)
    if output.exists() and not overwrite:
        raise ConversionError(f"{output} exists (pass --overwrite to replace it)")
    return output


def layer_progress(stream: Iterable[tuple[str, torch.Tensor]], num_layers: int, desc: str
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """``stream``'s (name, tensor) pairs, reporting progress by transformer layer on stderr
    (``platform.progress``): HF and megatron names both hold ``<root>.layers.<N>.``."""
    with Progress(num_layers, desc, unit="layers") as bar:
        for name, tensor in stream:
            parts = name.split(".")
            if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit():
                bar.update_to(int(parts[2]))  # the layers before this one are done
            yield name, tensor
        bar.update_to(num_layers)


# --- the two directions -----------------------------------------------------------------------
def hf_to_mcore_checkpoint(input_dir: Path, output_root: Path, *, overwrite: bool = False,
                           validate: bool = True, data: DataConfig | None = None,
                           log: Callable[[str], None] = print) -> ValidationReport | None:
    """HF Llama/Mixtral/mixed directory -> our checkpoint root (``iter_0000000``, ``latest``,
    ``config.yaml`` for training from it, ``hf/`` record). ``data``: config.yaml's data section
    (``config_from_hf``); without it data.tokenizer names the ``hf/`` record when the source
    has tokenizer files. Memory: one model copy."""
    input_dir = Path(input_dir)
    output_root = preflight([("--input", input_dir)], output_root, overwrite)
    ckpt = HFCheckpoint(input_dir)  # headers and sizes checked: truncation is caught here
    arch = arch_from_hf_config(ckpt.config)
    cfg = config_from_hf(ckpt.config, data=data)
    if data is None:
        cfg.data.tokenizer = source_tokenizer(input_dir, output_root.absolute() / HF_RECORD)
    dtype = ckpt.info(HF_EMBED).dtype if HF_EMBED in ckpt.keys() else torch.float32
    stream = hf_to_mcore(ckpt.get, arch, keys=ckpt.keys())  # key set checked before any write
    kind = "mixed dense/MoE" if is_mixed(arch) else ("MoE" if arch.num_experts else "dense")
    log(f"hf_to_mcore: {kind} model, {arch.num_layers} layers, {arch.num_experts} experts, "
        f"vocab {arch.vocab_size}, {dtype}")
    report = None
    with staged_dir(output_root, overwrite) as tmp:
        save_mcore_into(tmp, layer_progress(stream, arch.num_layers, "hf_to_mcore"), cfg,
                        dtype=dtype, hf_config=ckpt.config, tokenizer_dir=input_dir)
        if validate:
            report = _check(compare_logits((input_dir, "hf"), (tmp, "mcore"), arch.vocab_size),
                            log)
    if is_mixed(arch):
        log(f"note: {MIXED_NOTE}")
    root = output_root.absolute()
    command = (f"pretrain_moe.py --config {root / 'config.yaml'} --set checkpoint.load={root}")
    if data is None:
        log(f"note: {root / 'config.yaml'} has no training data (data.blend empty, data.mock "
            "false; pass --config RUN.yaml to carry a run's data section): set data.blend"
            + ("" if cfg.data.tokenizer else " and data.tokenizer")
            + f" there or with --set, then train from it: {command}")
    else:
        log(f"train from it: {command}")
    return report


def source_tokenizer(source: Path, record: Path) -> str | None:
    """Where the record of ``source``'s tokenizer will be (for data.tokenizer), if it has one:
    the record directory for HF tokenizer files, its tokenizer.model for SentencePiece."""
    if any((source / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return str(record)
    if (source / "tokenizer.model").is_file():
        return str(record / "tokenizer.model")
    return None


def export_tokenizer(cfg: Config, record: Path | None, override: str | None, out_dir: Path,
                     config: dict, log: Callable[[str], None]) -> bool:
    """The tokenizer files of an HF export into ``out_dir`` and its special token ids into
    ``config`` (config.json) where they are unset: a converted checkpoint's ``hf/`` record
    carries its source's files (copied by ``write_hf_checkpoint``); otherwise the run's
    tokenizer (``--tokenizer``, ``data.tokenizer``, the demo tokenizer) is written as files
    AutoTokenizer loads. A run without one (mock data) exports without, saying so. Returns
    whether it wrote tokenizer files (else the record's are to be copied)."""
    if override is None and record is not None and any(
            (record / name).is_file() for name in TOKENIZER_FILES):
        return False
    try:
        tok = checkpoint_tokenizer(cfg, override)
    except DataError as e:
        if override is not None:
            raise ConversionError(str(e)) from None
        log(f"WARNING: the export has no tokenizer files ({e}); AutoTokenizer will not load "
            "it")
        return False
    ids = write_tokenizer(tok, out_dir, cfg.model.max_position_embeddings, log)
    for key, value in ids.items():
        if config.get(key) is None:
            config[key] = value
    log(f"tokenizer: {tok.path} ({tok.kind}, {tok.vocab_size} tokens; "
        + ", ".join(f"{k} {v}" for k, v in ids.items()) + ")")
    return True


def _lossless(get: Callable[[str], torch.Tensor], keys: list[str], dtype: torch.dtype) -> bool:
    for name in keys:
        t = get(name)
        if not torch.equal(t.to(dtype).to(t.dtype), t):
            return False
    return True


def resolve_dtype(choice: str, get: Callable[[str], torch.Tensor], keys: list[str],
                  record_dtype: str | None) -> tuple[torch.dtype, bool]:
    """(output dtype, whether the weights survive it exactly). ``auto``: the dtype recorded at
    conversion (``hf/config.json``), else bf16, else fp32: the first that holds every weight
    exactly (a bf16-trained or bf16-sourced model comes back as bf16, an fp32 one as fp32)."""
    if choice not in DTYPE_CHOICES:
        raise ConversionError(f"unknown dtype {choice!r} (use {', '.join(DTYPE_CHOICES)})")
    wanted = DTYPE_CHOICES[choice]
    if wanted is not None:
        return wanted, _lossless(get, keys, wanted)
    candidates = [torch.bfloat16, torch.float32]
    if record_dtype in DTYPE_CHOICES and DTYPE_CHOICES[record_dtype] is not None:
        candidates.insert(0, DTYPE_CHOICES[record_dtype])  # type: ignore[arg-type]
    for dtype in candidates:
        if dtype == torch.float32 or _lossless(get, keys, dtype):
            return dtype, True
    raise AssertionError("unreachable")


def mcore_to_hf_checkpoint(input_path: Path, output_dir: Path, *, overwrite: bool = False,
                           validate: bool = True, max_shard_bytes: int = 2 * 10**9,
                           dtype: str = "auto", tokenizer: str | None = None,
                           log: Callable[[str], None] = print) -> ValidationReport | None:
    """Our checkpoint (root or iter dir, any EP it was saved at) -> HF directory: Llama when
    dense, Mixtral when every layer is MoE, else the mixed format, with the run's tokenizer
    (``export_tokenizer``) and generation_config.json. Memory: one fp32 model."""
    input_path = Path(input_path)
    output_dir = preflight([("--input", input_path)], output_dir, overwrite)
    if dtype not in DTYPE_CHOICES:
        raise ConversionError(f"unknown dtype {dtype!r} (use {', '.join(DTYPE_CHOICES)})")
    get, keys, arch, cfg = read_mcore_checkpoint(input_path)
    record = hf_record(input_path, arch)
    record_dtype = None
    if record is not None:
        source = read_hf_config(record)
        record_dtype = source.get("dtype") or source.get("torch_dtype")
    out_dtype, lossless = resolve_dtype(dtype, get, keys, record_dtype)
    rel_tolerance = 1e-4
    if not lossless:
        # A narrowing cast rounds every weight (bf16 keeps 8 significant bits): the result can
        # only match the source approximately.
        rel_tolerance = 2e-2
        log(f"note: the weights are not exactly representable in {out_dtype}; validation "
            f"tolerance relaxed to {rel_tolerance} x max(1, |logit|)")
    config = hf_config_from_mcore(cfg, arch, out_dtype, record)
    layout = [(name, shape, out_dtype) for name, shape in hf_shapes(arch).items()]
    model = "mixed (mlp_only_layers)" if is_mixed(arch) else config["architectures"][0]
    log(f"mcore_to_hf: {model}, {arch.num_layers} layers, {arch.num_experts} experts, "
        f"vocab {arch.vocab_size}, {out_dtype}")
    stream = ((name, t.to(out_dtype)) for name, t in mcore_to_hf(get, arch, keys=keys))
    report = None
    with staged_dir(output_dir, overwrite) as tmp:
        own = export_tokenizer(cfg, record, tokenizer, tmp, config, log)
        write_hf_checkpoint(tmp, layer_progress(stream, arch.num_layers, "mcore_to_hf"), layout,
                            config, max_shard_bytes, copy_from=None if own else record)
        if own and record is not None and (record / "generation_config.json").is_file():
            shutil.copy2(record / "generation_config.json", tmp / "generation_config.json")
        if not (tmp / "generation_config.json").is_file():
            gen = generation_config({k: config.get(k) for k in SPECIAL_IDS})
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        del get  # the fp32 state dict: free it before validation loads two models
        if validate:
            report = _check(compare_logits((input_path, "mcore"), (tmp, "hf"), arch.vocab_size,
                                           rel_tolerance=rel_tolerance),
                            log)
    if is_mixed(arch):
        log(f"WARNING: {MIXED_NOTE}")
    return report
