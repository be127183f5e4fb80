"""Expert routing by domain: per-layer heatmaps, specialization (TV distance) and entropy.

    moe-routing --checkpoint runs/tiny-cpu/checkpoints \\
        --text en=data/corpus/en_shakespeare.txt --text ja=data/corpus/ja_neko.txt \\
        --output runs/tiny-cpu/routing
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from megatron_ext.config.args import field_arg, int_arg, int_list_arg
from megatron_ext.config.fields import clip, short_repr
from megatron_ext.data.errors import DataError
from megatron_ext.platform.cli import ArgumentParser, run_cli
from megatron_ext.platform.fs import check_disjoint, recover_interrupted, replace_dir
from megatron_ext.platform.launch import free_port
from megatron_ext.platform.quiet import quiet_process

quiet_process()  # before megatron is imported: its import-time notices are noise here

EPILOG = """\
outputs (DIR is replaced as a whole, never left half-written):
  heatmap_layer{L}.png  domains x experts, share of the top-k assignments (%), per MoE layer L
  routing.md            mean TV distance to the mean usage, top-expert share, entropies;
                        the paper's numbers for comparison
  routing.json          every number, including the raw per-layer counts
layers are 0-based transformer layer indices, as in the training metrics moe/layer{L}/... and
HF's model.layers.{L}; only MoE layers can be chosen. Routing is counted
dropless (capacity factor off): the router's top-k choices, not what capacity would keep.
tokenizer: --tokenizer, else the checkpoint's data.tokenizer, else the demo tokenizer when the
checkpoint was trained with data.demo_corpus.
exit codes: 0 ok, 2 bad input (one line on stderr), 130 Ctrl-C, 143 SIGTERM.
"""
MARKER = "routing.json"  # an existing DIR holding this file is a previous report: replaceable


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint dir (iter_*) or a save root with `latest`")
    p.add_argument("--text", nargs="+", action="extend", required=True, metavar="LABEL=FILE",
                   help="one plain-text file per domain")
    p.add_argument("--output", required=True, type=Path, help="report directory")
    p.add_argument("--tokenizer", help="override the checkpoint's tokenizer")
    p.add_argument("--layers", type=_layers_arg, default="all",
                   help="comma-separated MoE layers, or all")
    p.add_argument("--max-tokens", type=int_arg(1, 2**31 - 1), default=200_000,
                   help="tokens per domain")
    p.add_argument("--seq-length", type=field_arg("data.seq_length"),
                   help="chunk length (default: the training one)")
    p.add_argument("--batch-size", type=field_arg("eval.batch_size"), default=8,
                   help="chunks per forward")
    return p.parse_args(argv)


def parse_texts(specs: Sequence[str]) -> dict[str, Path]:
    texts: dict[str, Path] = {}
    for spec in specs:
        label, sep, file = spec.partition("=")
        if not sep or not label or not file:
            raise DataError(f"--text expects LABEL=FILE, got {spec!r}")
        if label in texts:
            raise DataError(f"--text label {label!r} given twice")
        path = Path(file)
        if not path.is_file():
            raise DataError(f"text file not found: {path}")
        texts[label] = path
    return texts


_layer_list = int_list_arg(0, 1023, 1024)  # indices of model.num_layers (at most 1024)


def _layers_arg(text: str) -> str | list[int]:
    """--layers: ``all`` or bounded layer indices (checked against the model later)."""
    return "all" if text.strip() == "all" else _layer_list(text)


def parse_layers(layers: str | list[int], moe_layers: list[int]) -> list[int]:
    if isinstance(layers, str):
        if layers.strip() == "all":
            return moe_layers
        try:
            layers = _layer_list(layers)
        except argparse.ArgumentTypeError as e:
            raise DataError(f"--layers: {e}") from None
    unknown = sorted(set(layers) - set(moe_layers))
    if unknown or not layers:
        raise DataError(f"--layers: unknown layer(s) {short_repr(unknown)}; the checkpoint's "
                        f"MoE layers are {clip(','.join(map(str, moe_layers)), 100)}")
    return sorted(set(layers))


def check_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                              and not (out / MARKER).is_file())):
        raise DataError(f"--output {out} exists and is not a previous routing report; "
                        "choose another directory")


def check_inputs(output: Path, args: argparse.Namespace, *resolved: tuple[str, str]) -> None:
    """The report directory must not be, contain or lie inside any input (it replaces a
    previous report as a whole): the checkpoint (and what its ``latest`` names), every text
    file, the tokenizer. ``resolved``: inputs known only after reading the checkpoint."""
    from megatron_ext.conversion.convert import checkpoint_inputs  # torch: start-up time

    inputs = [*checkpoint_inputs("--checkpoint", Path(args.checkpoint)),
              *(("--text", spec.partition("=")[2]) for spec in args.text), *resolved]
    if args.tokenizer:
        inputs.append(("--tokenizer", args.tokenizer))
    check_disjoint(output, [(flag, path) for flag, path in inputs if path], error=DataError)


def install(tmp: Path, out: Path) -> None:
    """Swap the finished report in atomically; the previous report is removed after."""
    replace_dir(tmp, out)


def analyze(args: argparse.Namespace) -> int:
    from megatron_ext.analysis import routing as R
    from megatron_ext.checkpoint.load_model import checkpoint_config, load_model
    from megatron_ext.checkpoint.store import CheckpointError
    from megatron_ext.config.derived import moe_layer_pattern, padded_vocab
    from megatron_ext.data.run_tokenizer import tokenizer_path
    from megatron_ext.data.tokenizer import load_tokenizer
    from megatron_ext.platform.dist import shutdown

    texts = parse_texts(args.text)
    if args.max_tokens < 1 or args.batch_size < 1:
        raise DataError("--max-tokens and --batch-size must be positive")
    try:
        verified = checkpoint_config(args.checkpoint)
    except CheckpointError as err:
        raise DataError(f"checkpoint: {err}") from err
    ckpt, cfg = verified.path, verified.config
    moe_layers = [i for i, moe in enumerate(moe_layer_pattern(cfg.model, cfg.moe)) if moe]
    if not moe_layers:
        raise DataError(f"{ckpt}: a dense model has no routers to analyze")
    layers = parse_layers(args.layers, moe_layers)
    seq_length = args.seq_length or cfg.data.seq_length
    if not 1 <= seq_length <= cfg.model.max_position_embeddings:
        raise DataError(f"--seq-length must be in 1..{cfg.model.max_position_embeddings}")
    out = args.output.resolve()
    recover_interrupted(out)  # a previous report that a killed fallback swap left aside
    check_output(out)
    tokenizer_file = tokenizer_path(cfg, args.tokenizer)
    check_inputs(args.output, args, ("--checkpoint", str(ckpt)), ("tokenizer", tokenizer_file))
    tokenizer = load_tokenizer(tokenizer_file)
    rows = padded_vocab(cfg.model)
    if tokenizer.vocab_size > rows:
        raise DataError(f"tokenizer {tokenizer_file} has {tokenizer.vocab_size} tokens, more "
                        f"than the model's vocabulary ({rows}): wrong tokenizer?")
    streams = {label: R.read_token_stream(path, tokenizer, args.max_tokens)
               for label, path in texts.items()}

    if "WORLD_SIZE" not in os.environ:  # alone: don't collide with a run on the default port
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    try:
        # dropless (load_model): count the router's choices, not what capacity kept
        cfg, model = load_model(verified)  # not hashed again
        counts = R.collect_routing(model, streams, seq_length, cfg.moe.top_k, layers,
                                   args.batch_size)
    except CheckpointError as err:
        raise DataError(f"checkpoint: {err}") from err
    finally:
        shutdown()

    summary = R.summarize(counts)
    summary.update(checkpoint=str(ckpt), tokenizer=str(tokenizer_file), seq_length=seq_length,
                   texts={label: str(path) for label, path in texts.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for layer in summary["per_layer"]:
            R.plot_heatmap(layer["usage"], counts.labels, layer["layer"], counts.top_k,
                           tmp / f"heatmap_layer{layer['layer']}.png")
        title = f"Expert routing by domain: {ckpt.parent.name}/{ckpt.name}"
        (tmp / "routing.md").write_text(R.render_markdown(summary, title), encoding="utf-8")
        (tmp / MARKER).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    avg = summary["average"]
    sizes = ", ".join(f"{label} {d['tokens']:,}" for label, d in summary["per_domain"].items())
    print(f"routing: tokens {sizes} | mean TV {avg['mean_tv']:.3f} | usage entropy "
          f"{avg['usage_entropy']:.3f} | top-expert share {avg['top_expert_share']:.3f} | "
          f"report {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    check_inputs(args.output, args)  # before megatron's import and any slow work
    return analyze(args)


if __name__ == "__main__":  # the guard matters: dist_checkpointing starts worker processes
    sys.exit(main())
