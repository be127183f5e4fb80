"""Generate text with one of our checkpoints: greedy by default, batched, stops at EOS.

    moe-generate --checkpoint runs/demo/checkpoints --prompt "To be, or not to be"
    moe-generate --checkpoint CKPT --prompts prompts.txt --temperature 0.8 \\
        --top-p 0.95 --seed 1 --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from megatron_ext.config.args import field_arg, float_arg, int_arg
from megatron_ext.data.errors import DataError
from megatron_ext.data.records import DEFAULT_MAX_PROMPTS_BYTES, read_prompts_file
from megatron_ext.platform.cli import ArgumentParser, run_cli
from megatron_ext.platform.launch import free_port
from megatron_ext.platform.quiet import quiet_process

EPILOG = """\
prompts: --prompt TEXT (repeatable), or --prompts FILE with one prompt per non-empty line
(UTF-8). Nothing is added to a prompt (no BOS, no newline).
output: per prompt, a header line '=== prompt N ===' then the prompt and its continuation; with
--json one object per line: {"prompt", "completion", "text" (prompt + completion), "prompt_ids",
"completion_ids", "stop" ("eos", "length" or "context")}. Timing goes to stderr.
sampling: --temperature 0 (default) is greedy; otherwise temperature + nucleus (--top-p)
sampling, reproducible with --seed. Generation stops at the tokenizer's EOS, after
--max-new-tokens, or at the model's context (max_position_embeddings).
tokenizer: --tokenizer, else the checkpoint's data.tokenizer, else the demo tokenizer when the
checkpoint was trained with data.demo_corpus.
The model runs in this one process (fp32 on CPU), whatever expert-/tensor-parallel layout the
checkpoint was saved with.
exit codes: 0 ok, 2 bad input (one line on stderr), 130 Ctrl-C, 143 SIGTERM.
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint dir (iter_*) or a save root with `latest`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable)")
    src.add_argument("--prompts", type=Path, metavar="FILE", help="one prompt per line")
    p.add_argument("--max-new-tokens", type=int_arg(1, 2**22), default=64)
    p.add_argument("--temperature", type=float_arg(0, 1e6), default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float_arg(0, 1, lo_open=True), default=1.0,
                   help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=field_arg("train.seed"), help="sampling seed (default: random)")
    p.add_argument("--batch-size", type=field_arg("eval.batch_size"), default=8,
                   help="prompts per forward")
    p.add_argument("--max-prompts-bytes", type=int_arg(1, 2**34),
                   default=DEFAULT_MAX_PROMPTS_BYTES, metavar="N",
                   help="refuse a larger --prompts file (default 4 MiB)")
    p.add_argument("--tokenizer", help="override the checkpoint's tokenizer")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt and line")
    return p.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of --prompt or --prompts; an empty file or prompt is a DataError."""
    if args.prompt is not None:
        prompts = list(args.prompt)
    else:
        prompts = read_prompts_file(args.prompts, args.max_prompts_bytes)
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise DataError(f"--prompt {i + 1} is empty")
    return prompts


def check_numbers(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise DataError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {args.batch_size}")


def completion_record(tokenizer, prompt: str, prompt_ids: list[int], ids: list[int],
                      max_new_tokens: int, max_length: int) -> dict:
    """What is printed for one prompt. The text is decoded as one sequence, so a character
    whose bytes straddle the prompt/continuation boundary decodes whole."""
    text = tokenizer.decode(prompt_ids + ids)
    prefix = tokenizer.decode(prompt_ids)
    completion = text[len(prefix):] if text.startswith(prefix) else tokenizer.decode(ids)
    if len(prompt_ids) + len(ids) >= max_length:
        why = "context"
    elif len(ids) >= max_new_tokens:
        why = "length"
    else:
        why = "eos"
    return {"prompt": prompt, "completion": completion, "text": prompt + completion,
            "prompt_ids": prompt_ids, "completion_ids": ids, "stop": why}


def show(records: list[dict], as_json: bool) -> None:
    for n, rec in enumerate(records, 1):
        if as_json:
            print(json.dumps(rec, ensure_ascii=False), flush=True)
        else:
            print(f"=== prompt {n} ===\n{rec['text']}\n", flush=True)


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    check_numbers(args)
    prompts = read_prompts(args)
    quiet_process(all_from_internals=True)  # before megatron is imported: its notices are noise
    # why inside: megatron-core and torch take seconds to import; --help, usage errors and
    # bad prompt files come back before
    from megatron_ext.checkpoint.load_model import checkpoint_config, load_model
    from megatron_ext.data.run_tokenizer import checkpoint_tokenizer
    from megatron_ext.evaluation.generate import check_prompts, check_sampling, generate
    from megatron_ext.platform.dist import shutdown

    check_sampling(args.temperature, args.top_p)
    verified = checkpoint_config(args.checkpoint)
    cfg = verified.config
    tokenizer = checkpoint_tokenizer(cfg, args.tokenizer)
    prompt_ids = tokenizer.encode_batch(prompts)
    max_length = cfg.model.max_position_embeddings
    check_prompts(prompt_ids, max_length)  # before the (slow) model load
    if "WORLD_SIZE" not in os.environ:  # alone: don't collide with a run on the default port
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    start = time.perf_counter()
    try:
        cfg, model = load_model(verified)  # not hashed again
        outs = generate(model, prompt_ids, args.max_new_tokens, eos_id=tokenizer.eod,
                        vocab_size=min(tokenizer.vocab_size, cfg.model.vocab_size),
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                        batch_size=args.batch_size, max_length=max_length)
    finally:
        shutdown()
    records = [completion_record(tokenizer, p, ids_in, ids, args.max_new_tokens, max_length)
               for p, ids_in, ids in zip(prompts, prompt_ids, outs, strict=True)]
    show(records, args.json)
    new = sum(len(ids) for ids in outs)
    print(f"generate: {len(prompts)} prompt(s), {new} new tokens in "
          f"{time.perf_counter() - start:.1f} s ({verified.path})", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":  # the guard matters: dist_checkpointing starts worker processes
    sys.exit(main())
