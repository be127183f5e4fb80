"""What the expert-similarity metric (``logging.expert_similarity``) costs per log step.

1. ``expert_similarity(model)`` on the ``--config`` model built in this process (one rank, fp32):
   median of 20 calls, against the run's log interval.
2. The same math for one MoE layer at ``--shape E,H,F`` (default 8x152M's 8,512,2048) on this
   machine's device: the 2E products fc2 @ gate / fc2 @ up in fp32, then the fp64 Gram matrix,
   with the FLOPs and bytes it moves, scaled to ``--layers`` MoE layers.

  python tools/bench/expert_similarity.py --config configs/tiny-cpu.yaml
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megatron_ext.platform import cpu


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def model_cost(config: str) -> None:
    from megatron_ext.config.loader import load_config  # why: after cpu.enable()
    from megatron_ext.model.builder import build_model, resolve_backends
    from megatron_ext.platform.dist import init_distributed
    from megatron_ext.training.callbacks.expert_similarity import expert_similarity

    cfg = load_config(config, ["data.mock=true", "data.demo_corpus=false",
                               "train.precision=fp32"])
    init_distributed(cfg)
    model = build_model(cfg, resolve_backends(cfg))
    if torch.cuda.is_available():
        model.cuda()
    ms = _median_ms(lambda: expert_similarity(model), 20)
    print(f"{config}: expert_similarity() {ms:.1f} ms per log step "
          f"(every {cfg.train.log_interval} steps)")


def layer_cost(experts: int, hidden: int, ffn: int, layers: int) -> None:
    from megatron_ext.training.callbacks.expert_similarity import pairwise_cosines

    device = "cuda" if torch.cuda.is_available() else "cpu"
    fc1 = torch.randn(experts, 2 * ffn, hidden, device=device, dtype=torch.bfloat16)
    fc2 = torch.randn(experts, hidden, ffn, device=device, dtype=torch.bfloat16)

    def one_layer() -> torch.Tensor:
        maps = [torch.cat([(fc2[e].float() @ w.float()).flatten() for w in fc1[e].chunk(2)])
                for e in range(experts)]
        return pairwise_cosines(torch.stack(maps))

    ms = _median_ms(one_layer, 3)
    flops = experts * 2 * 2 * hidden * ffn * hidden + experts**2 * 2 * hidden**2 * 2
    weights = experts * 3 * hidden * ffn * 2  # bf16, read once
    maps = experts * 2 * hidden**2 * 4  # fp32: what EP all-gathers per layer
    print(f"one layer E={experts} H={hidden} F={ffn} on {device}: {ms:.0f} ms, "
          f"{flops / 1e9:.1f} GFLOP, weights {weights / 2**20:.0f} MiB, maps {maps / 2**20:.1f} "
          f"MiB; x{layers} layers: {layers * flops / 1e9:.0f} GFLOP, "
          f"{layers * maps / 2**20:.0f} MiB of maps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny-cpu.yaml")
    parser.add_argument("--shape", default="8,512,2048", help="E,H,F of one MoE layer")
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args()
    cpu.enable_if_needed()
    model_cost(args.config)
    layer_cost(*(int(x) for x in args.shape.split(",")), args.layers)


if __name__ == "__main__":
    main()
