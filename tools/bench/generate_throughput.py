"""Generation throughput: ``megatron_ext.evaluation.generate`` (KV cache) against transformers'
``generate`` on the HF export of the same checkpoint, greedy, same prompts, in one process.

For each shape (``benchlib.runs.SHAPES``: tiny-cpu, and wide = the 8x152M layer shape with 4
layers), trains a small MoE with ``pretrain_moe.py`` on the demo corpus (a few steps), exports
it with ``tools/convert/mcore_to_hf.py`` (fp32), and generates ``--new-tokens`` tokens (EOS
ignored, so every row generates them all) for ``--prompts`` prompts of different lengths cut
from the demo corpus: one prompt at a time (batch 1) and all of them in one batch (batch 8).
transformers gets the batch left-padded with an attention mask, as its ``generate`` expects,
and runs without megatron_ext's CPU-path function mode (its users never have it). The two
backends alternate within each repeat (load changes hit both); tokens/s = generated tokens /
wall time (``--clock cpu``: this process's CPU time, steadier on a shared, loaded machine);
reported: the best of the repeats per backend and their ratio, and the ratio per
repeat (median, range). The greedy
ids are compared token for token with transformers one prompt at a time.

  python tools/bench/generate_throughput.py --shapes tiny-cpu,wide --new-tokens 64
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import runs
from benchlib.report import device_name

from megatron_ext.platform.cli import ArgumentParser, run_cli
from megatron_ext.platform.quiet import quiet_process

ROOT = Path(__file__).resolve().parents[2]
PROMPT_TOKENS = (5, 9, 14, 18, 23, 27, 32, 36)  # different lengths: batching pads / aligns


def corpus_prompts(tok, count: int) -> list[list[int]]:
    """``count`` prompts of PROMPT_TOKENS lengths, consecutive pieces of the English corpus."""
    text = (ROOT / "data" / "corpus" / "en_shakespeare.txt").read_text(encoding="utf-8")
    ids = tok.encode(text[200_000:260_000])
    lengths = [PROMPT_TOKENS[i % len(PROMPT_TOKENS)] for i in range(count)]
    starts = [sum(lengths[:i]) * 3 for i in range(count)]
    return [ids[s:s + n] for s, n in zip(starts, lengths, strict=True)]


class Ours:
    name = "ours (megatron, KV cache)"

    def __init__(self, ckpt: Path):
        from megatron_ext.checkpoint.load_model import load_model
        from megatron_ext.evaluation.generate import generate

        self.cfg, self.model = load_model(ckpt)
        self._generate = generate

    def run(self, prompts: list[list[int]], new: int) -> list[list[int]]:
        return self._generate(self.model, prompts, new, eos_id=None,
                              vocab_size=self.cfg.model.vocab_size, batch_size=len(prompts))


class Transformers:
    name = "transformers generate (export)"

    def __init__(self, hf: Path, pad_id: int):
        import torch
        from transformers import AutoModelForCausalLM

        from megatron_ext.platform.cpu import native_torch

        self.torch, self.pad_id, self.native = torch, pad_id, native_torch
        self.model = AutoModelForCausalLM.from_pretrained(
            hf, dtype=torch.float32, attn_implementation="sdpa").eval()
        self.model.generation_config.eos_token_id = None  # every row generates all its tokens
        self.experts = getattr(self.model.config, "_experts_implementation", None) or "eager"

    def run(self, prompts: list[list[int]], new: int) -> list[list[int]]:
        torch = self.torch
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(prompts):  # left padding: every row ends at the same column
            ids[b, width - len(p):] = torch.tensor(p)
            mask[b, width - len(p):] = 1
        # Without megatron_ext's CPU-path function mode (on in this process since our model
        # loaded): lm-eval and users run transformers in processes that never had it.
        with torch.no_grad(), self.native():
            out = self.model.generate(ids, attention_mask=mask, do_sample=False, num_beams=1,
                                      max_new_tokens=new,
                                      pad_token_id=self.pad_id, use_cache=True)
        return out[:, width:].tolist()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(backend, prompts: list[list[int]], new: int, batch: int,
          clock=time.perf_counter) -> tuple[float, list]:
    """(tokens/s, ids) of ``prompts`` generated ``batch`` at a time, timed by ``clock``."""
    start = clock()
    ids = []
    for i in range(0, len(prompts), batch):
        ids += backend.run(prompts[i:i + batch], new)
    return sum(len(x) for x in ids) / (clock() - start), ids


def measure(shape: str, ckpt: Path, hf: Path, a) -> dict:
    from megatron_ext.data.run_tokenizer import checkpoint_tokenizer
    from megatron_ext.platform.dist import shutdown

    ours = Ours(ckpt)
    tok = checkpoint_tokenizer(ours.cfg)
    theirs = Transformers(hf, tok.eod)
    prompts = corpus_prompts(tok, a.prompts)
    for backend in (ours, theirs):  # warm-up (first-call allocations, lazy imports)
        backend.run(prompts[:2], 4)
    rows, ids = {}, {}
    for _ in range(a.repeats):
        for batch in a.batch_sizes:
            for backend in (ours, theirs):
                rate, out = timed(backend, prompts, a.new_tokens, batch, CLOCKS[a.clock])
                rows.setdefault((batch, backend.name), []).append(rate)
                ids[(batch, backend.name)] = out
    reference = ids[(1, theirs.name)]
    same = {key: out == reference for key, out in ids.items()}
    m = ours.cfg.model
    shutdown()
    return {"shape": shape, "rates": rows, "same": same, "experts": theirs.experts,
            "ours": ours.name, "theirs": theirs.name,
            "lengths": [len(p) for p in prompts],
            "dims": f"{m.num_layers} layers, hidden {m.hidden_size}, "
                    f"{m.num_attention_heads}/{m.num_kv_heads or m.num_attention_heads} heads, "
                    f"d_ff {m.ffn_hidden_size}, {ours.cfg.moe.num_experts} experts "
                    f"top-{ours.cfg.moe.top_k}, vocab {m.vocab_size}"}


def render(results: list[dict], a, cmd: str) -> str:
    """Per shape and batch size: best tok/s of the repeats for each backend and their ratio
    (interference from other processes only slows a run down, so the best is the least
    disturbed), then the ratio per repeat: median and range."""
    lines = [f"Device: {device_name()}, torch threads: {_threads()}, clock: {a.clock}. "
             f"Command: `{cmd}`.", "",
             "| shape | batch | ours tok/s (best) | transformers tok/s (best) | ours / "
             "transformers, best | per repeat: median (range) | same greedy ids |",
             "|---|---:|---:|---:|---:|---|---|"]
    for r in results:
        for batch in a.batch_sizes:
            mine, theirs = r["rates"][(batch, r["ours"])], r["rates"][(batch, r["theirs"])]
            ratios = [x / y for x, y in zip(mine, theirs, strict=True)]
            same = r["same"][(batch, r["ours"])] and r["same"][(batch, r["theirs"])]
            lines.append(f"| {r['shape']} | {batch} | {max(mine):.1f} | {max(theirs):.1f} | "
                         f"{max(mine) / max(theirs):.2f}x | {statistics.median(ratios):.2f}x "
                         f"({min(ratios):.2f}-{max(ratios):.2f}) | {'yes' if same else 'NO'} |")
    lines.append("")
    for r in results:
        lines.append(f"- {r['shape']}: {r['dims']}; prompt lengths {r['lengths']}; "
                     f"transformers experts implementation: {r['experts']}")
    return "\n".join(lines)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _bench(argv: list[str] | None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="tiny-cpu,wide", help=f"of {', '.join(runs.SHAPES)}")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall time, or this process's CPU time (both backends run single-"
                        "threaded here: on a loaded machine it leaves out the time other "
                        "processes hold the cores)")
    p.add_argument("--checkpoint", type=Path, help="our checkpoint (one shape; default: train)")
    p.add_argument("--hf", type=Path, help="its fp32 HF export (with --checkpoint)")
    p.add_argument("--workdir", type=Path,
                   help="keep the trained checkpoints here and reuse them (default: a temporary "
                        "directory, removed)")
    a = p.parse_args(argv)
    a.batch_sizes = [int(x) for x in a.batch_sizes.split(",") if x]
    shapes = [s for s in a.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in runs.SHAPES]
    if unknown or bool(a.checkpoint) != bool(a.hf):
        p.error(f"unknown shape {unknown}" if unknown else "--checkpoint and --hf go together")
    quiet_process(all_from_internals=True)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="generate_bench_"))
    results = []
    try:
        # Every training and export first: they are subprocesses, and this process holds a
        # process group (and its port) once a model is loaded.
        models = ({str(a.checkpoint): (a.checkpoint, a.hf)} if a.checkpoint else
                  {shape: runs.train_and_export(work, shape) for shape in shapes})
        for name, (ckpt, hf) in models.items():
            results.append(measure(name, ckpt, hf, a))
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    given = sys.argv[1:] if argv is None else argv
    print(render(results, a, " ".join(["python", "tools/bench/generate_throughput.py", *given])))
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return run_cli(_bench, argv)


if __name__ == "__main__":
    sys.exit(main())
