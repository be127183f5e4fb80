"""Expert specialization: which experts each domain's tokens are routed to (paper section 5).

Three parts:
  * pure metrics on count tensors ``counts[..., domains, experts]`` (how many top-k assignments
    of each domain's tokens went to each expert), unit-tested on hand-computed examples;
  * ``RouterChoiceCounter``: forward hooks on megatron's ``TopKRouter`` that fill those counts
    (plus the per-token router entropy) while a model runs over one domain's tokens at a time;
  * report helpers (JSON-able summary, Markdown, heatmap PNG) used by ``moe-routing``.

The paper's specialization number is the mean, over domains, of the total-variation distance
between a domain's expert-usage distribution and the average of those distributions over
domains (unweighted: every domain counts once, whatever its token count). 0 means every domain
uses the experts identically (naive upcycling: ~0.02); from-scratch MoE reaches ~0.3.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core.transformer.moe.router import TopKRouter

from megatron_ext.data.errors import DataError
from megatron_ext.model import inference
from megatron_ext.model.builder import layer_index
from megatron_ext.platform.progress import Progress

# Paper, section 5 (8 experts, top-2, ~205k tokens per domain); see docs/REFERENCE.md section 2.
PAPER_REFERENCE: dict[str, dict[str, float]] = {
    "from scratch": {"mean_tv": 0.295, "usage_entropy": 1.52},
    "naive upcycling": {"mean_tv": 0.020, "usage_entropy": 0.91},
    "Drop-Upcycling r=0.5": {"mean_tv": 0.264, "usage_entropy": 1.58},
}


# ----------------------------------------------------------------------------- metrics


def usage_distribution(counts: torch.Tensor) -> torch.Tensor:
    """Fractions of the top-k assignments per expert: ``counts[..., E]`` normalized over E.

    A row without any assignment stays all-zero rather than becoming NaN.
    """
    counts = counts.to(torch.float64)
    total = counts.sum(dim=-1, keepdim=True)
    return counts / total.clamp(min=1.0)


def tv_to_mean(counts: torch.Tensor) -> torch.Tensor:
    """Total-variation distance of each domain's usage to the mean usage over domains.

    ``counts[..., D, E]`` -> ``[..., D]``. TV(p, q) = 1/2 sum_e |p_e - q_e|, in [0, 1].
    """
    usage = usage_distribution(counts)
    mean = usage.mean(dim=-2, keepdim=True)
    return 0.5 * (usage - mean).abs().sum(dim=-1)


def top_expert_share(counts: torch.Tensor) -> torch.Tensor:
    """Share of a domain's assignments that go to its most-used expert: ``[..., D, E] -> [..., D]``.

    Ranges from 1/E (uniform) to 1/top_k: every token picks top_k distinct experts, so one
    expert gets at most one of each token's top_k assignments (0.5 for top-2).
    """
    return usage_distribution(counts).max(dim=-1).values


def usage_entropy(counts: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each usage distribution, ``[..., E] -> [...]``; ln E when uniform."""
    usage = usage_distribution(counts)
    return -torch.special.xlogy(usage, usage).sum(dim=-1)  # xlogy: 0 * log 0 = 0


def mean_token_entropy(entropy_sums: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean per-token router entropy from summed entropies and token counts (0 where no tokens)."""
    return entropy_sums.to(torch.float64) / tokens.to(torch.float64).clamp(min=1.0)


def token_router_entropy(logits: torch.Tensor, score_function: str = "softmax") -> torch.Tensor:
    """Entropy (nats) of each token's full router distribution, ``[tokens, E] -> [tokens]``.

    With a sigmoid score function the per-expert scores are normalized to sum to one first.
    """
    logits = logits.to(torch.float32)
    if score_function == "sigmoid":
        scores = torch.sigmoid(logits)
        probs = scores / scores.sum(dim=-1, keepdim=True)
    else:
        probs = torch.softmax(logits, dim=-1)
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


# ----------------------------------------------------------------------------- collection


def moe_routers(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """The top-k routers of ``model`` by 0-based transformer layer index."""
    routers = {}
    for module in model.modules():
        if isinstance(module, TopKRouter):
            routers[layer_index(module)] = module
    return dict(sorted(routers.items()))


class RouterChoiceCounter:
    """Counts each router's top-k choices per domain while the model runs (eval forwards only).

    Set ``domain`` to the index of the domain whose tokens the next forwards see; forwards with
    ``domain = None`` are not counted. Use as a context manager so the hooks are removed.
    """

    def __init__(self, model: torch.nn.Module, num_domains: int,
                 layers: Sequence[int] | None = None):
        routers = moe_routers(model)
        if not routers:
            raise DataError("the model has no MoE layer (no top-k router)")
        self.layers = list(routers) if layers is None else list(layers)
        if not self.layers:
            raise DataError("no layers to analyze")
        unknown = [layer for layer in self.layers if layer not in routers]
        if unknown:
            raise DataError(f"layer(s) {unknown} are not MoE layers; MoE layers: {list(routers)}")
        num_experts = int(routers[self.layers[0]].config.num_moe_experts)
        shape = (len(self.layers), num_domains)
        self.counts = torch.zeros(*shape, num_experts, dtype=torch.int64)
        self.entropy_sums = torch.zeros(*shape, dtype=torch.float64)
        self.tokens = torch.zeros(*shape, dtype=torch.int64)
        self.domain: int | None = None
        self._handles = [routers[layer].register_forward_hook(self._hook(row))
                         for row, layer in enumerate(self.layers)]

    def _hook(self, row: int):
        def hook(module: torch.nn.Module, inputs: tuple, outputs: tuple) -> None:
            if self.domain is None:
                return
            routing_map = outputs[1]  # [tokens, experts] bool: the top-k choices
            self.counts[row, self.domain] += routing_map.sum(dim=0).to("cpu", torch.int64)
            # Recomputing the gate GEMM is cheap (hidden x E per token) and gives the full
            # router distribution, which the sparse top-k probs in ``outputs[0]`` no longer hold.
            hidden = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            bias = None if module.bias is None else module.bias.float()
            logits = torch.nn.functional.linear(hidden, module.weight.float(), bias)
            entropy = token_router_entropy(logits, getattr(module, "score_function", "softmax"))
            self.entropy_sums[row, self.domain] += float(entropy.sum())
            self.tokens[row, self.domain] += routing_map.shape[0]

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> RouterChoiceCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_token_stream(path: str | Path, tokenizer, max_tokens: int,
                      piece_chars: int = 1 << 16) -> list[int]:
    """Token ids of the first ``max_tokens`` tokens of a UTF-8 text file.

    Encodes line-aligned pieces of ~``piece_chars`` characters and stops once enough tokens
    are in, so a multi-GB file costs no more than the tokens asked for.
    """
    ids: list[int] = []
    piece: list[str] = []
    size = 0
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                piece.append(line)
                size += len(line)
                if size >= piece_chars:
                    ids.extend(tokenizer.encode("".join(piece)))
                    piece, size = [], 0
                    if len(ids) >= max_tokens:
                        break
            else:
                if piece:
                    ids.extend(tokenizer.encode("".join(piece)))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except OSError as err:
        raise DataError(f"cannot read text file {path}: {err.strerror or err}") from err
    if not ids:
        raise DataError(f"{path}: no tokens (empty text file?)")
    return ids[:max_tokens]


def token_batches(ids: Sequence[int], seq_length: int, batch_size: int) -> Iterator[torch.Tensor]:
    """``[b, seq_length]`` batches of consecutive chunks; a shorter tail runs as its own row."""
    full = len(ids) // seq_length
    rows = torch.tensor(list(ids[: full * seq_length]), dtype=torch.long).view(full, seq_length)
    for start in range(0, full, batch_size):
        yield rows[start:start + batch_size]
    if len(ids) > full * seq_length:
        yield torch.tensor(list(ids[full * seq_length:]), dtype=torch.long).view(1, -1)


@dataclass
class RoutingCounts:
    labels: list[str]
    layers: list[int]  # 0-based transformer layer index of each row
    counts: torch.Tensor  # [layers, domains, experts] top-k assignments
    entropy_sums: torch.Tensor  # [layers, domains] summed per-token router entropy
    tokens: torch.Tensor  # [layers, domains] tokens routed
    top_k: int


def collect_routing(model: torch.nn.Module, streams: dict[str, Sequence[int]], seq_length: int,
                    top_k: int, layers: Sequence[int] | None = None,
                    batch_size: int = 8) -> RoutingCounts:
    """Run ``model`` over each domain's token stream in fixed-length chunks and count choices
    (progress on stderr: the forwards are most of a routing analysis' minutes)."""
    labels = list(streams)
    total = sum(len(stream) for stream in streams.values())
    with RouterChoiceCounter(model, len(labels), layers) as counter, \
            Progress(total, "routing", unit="tokens") as bar:
        for index, label in enumerate(labels):
            counter.domain = index
            for batch in token_batches(streams[label], seq_length, batch_size):
                inference.logits(model, batch)
                bar.update(batch.numel(), domain=label)
        counter.domain = None
    return RoutingCounts(labels, counter.layers, counter.counts, counter.entropy_sums,
                         counter.tokens, top_k)


# ----------------------------------------------------------------------------- reporting


def _per_domain(labels: Sequence[str], values: torch.Tensor) -> dict[str, float]:
    return {label: float(v) for label, v in zip(labels, values, strict=False)}


def summarize(rc: RoutingCounts) -> dict:
    """All numbers as a JSON-able dict: per layer, per domain (mean over layers), averages."""
    tv, share = tv_to_mean(rc.counts), top_expert_share(rc.counts)  # [L, D]
    entropy = usage_entropy(rc.counts)
    token_entropy = mean_token_entropy(rc.entropy_sums, rc.tokens)
    usage = usage_distribution(rc.counts)
    num_experts = rc.counts.shape[-1]
    per_layer = []
    for row, layer in enumerate(rc.layers):
        per_layer.append({
            "layer": layer,
            "counts": rc.counts[row].tolist(),
            "usage": usage[row].tolist(),
            "mean_usage": usage[row].mean(dim=0).tolist(),
            "mean_tv": float(tv[row].mean()),
            "tv_to_mean": _per_domain(rc.labels, tv[row]),
            "top_expert": {label: int(e) for label, e in
                           zip(rc.labels, usage[row].argmax(dim=-1), strict=False)},
            "top_expert_share": _per_domain(rc.labels, share[row]),
            "usage_entropy": _per_domain(rc.labels, entropy[row]),
            "token_router_entropy": _per_domain(rc.labels, token_entropy[row]),
        })
    per_domain = {
        label: {
            "tokens": int(rc.tokens[0, d]),
            "tv_to_mean": float(tv[:, d].mean()),
            "top_expert_share": float(share[:, d].mean()),
            "usage_entropy": float(entropy[:, d].mean()),
            "token_router_entropy": float(token_entropy[:, d].mean()),
        }
        for d, label in enumerate(rc.labels)
    }
    return {
        "num_experts": num_experts,
        "top_k": rc.top_k,
        "layers": rc.layers,
        "domains": rc.labels,
        "uniform_entropy": math.log(num_experts),
        "average": {
            "mean_tv": float(tv.mean()),
            "top_expert_share": float(share.mean()),
            "usage_entropy": float(entropy.mean()),
            "token_router_entropy": float(token_entropy.mean()),
        },
        "per_domain": per_domain,
        "per_layer": per_layer,
        "paper": PAPER_REFERENCE,
    }


def render_markdown(summary: dict, title: str = "Expert routing by domain") -> str:
    """A short report: per-domain table, per-layer table, the paper's numbers for comparison."""
    avg = summary["average"]
    lines = [
        f"# {title}", "",
        f"{summary['num_experts']} experts, top-{summary['top_k']}; MoE layers (0-based) "
        f"{', '.join(map(str, summary['layers']))}. Shares are fractions of the top-k "
        f"assignments; entropies in nats (uniform over the experts = "
        f"{summary['uniform_entropy']:.2f}). Per-domain values are means over layers.", "",
        "| domain | tokens | TV to mean usage | top-expert share | usage entropy "
        "| per-token router entropy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, d in summary["per_domain"].items():
        lines.append(f"| {label} | {d['tokens']:,} | {d['tv_to_mean']:.3f} | "
                     f"{d['top_expert_share']:.3f} | {d['usage_entropy']:.3f} | "
                     f"{d['token_router_entropy']:.3f} |")
    lines.append(f"| **average** | | **{avg['mean_tv']:.3f}** | {avg['top_expert_share']:.3f} | "
                 f"**{avg['usage_entropy']:.3f}** | {avg['token_router_entropy']:.3f} |")
    lines += ["", "| layer | mean TV | mean usage entropy | top expert per domain |",
              "|---:|---:|---:|---|"]
    for layer in summary["per_layer"]:
        tops = ", ".join(f"{k}: E{v}" for k, v in layer["top_expert"].items())
        mean_entropy = sum(layer["usage_entropy"].values()) / len(layer["usage_entropy"])
        lines.append(f"| {layer['layer']} | {layer['mean_tv']:.3f} | {mean_entropy:.3f} "
                     f"| {tops} |")
    lines += ["", "Paper (8 experts, top-2, ~205k tokens per domain; domains English and "
              "Japanese web and Wikipedia, and code; averaged over layers):", "",
              "| model | mean TV | usage entropy |", "|---|---:|---:|"]
    for name, ref in summary["paper"].items():
        lines.append(f"| {name} | {ref['mean_tv']:.3f} | {ref['usage_entropy']:.2f} |")
    lines += ["", "TV numbers depend on the domain set: with fewer or more similar domains the "
              "same specialization gives a smaller distance.", ""]
    return "\n".join(lines)


def plot_heatmap(usage: Sequence[Sequence[float]], labels: Sequence[str], layer: int,
                 top_k: int, path: str | Path) -> None:
    """Domains x experts heatmap of assignment shares (%), every cell annotated (paper Fig. 5)."""
    # Figure + Agg canvas directly: no pyplot global state, no display backend needed.
    # why inside: matplotlib takes ~1 s to import and only the report's plots need it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = torch.as_tensor(usage, dtype=torch.float64) * 100.0
    num_domains, num_experts = data.shape
    fig = Figure(figsize=(1.6 + 0.75 * num_experts, 1.4 + 0.55 * num_domains))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    vmax = max(float(data.max()), 100.0 / num_experts)
    image = ax.imshow(data.numpy(), cmap="Blues", vmin=0.0, vmax=vmax, aspect="auto")
    for d in range(num_domains):
        for e in range(num_experts):
            value = float(data[d, e])
            ax.text(e, d, f"{value:.1f}", ha="center", va="center", fontsize=8,
                    color="white" if value > 0.6 * vmax else "black")
    ax.set_xticks(range(num_experts), [f"E{e}" for e in range(num_experts)])
    ax.set_yticks(range(num_domains), list(labels))
    ax.set_xlabel("expert")
    ax.set_title(f"layer {layer}: share of top-{top_k} assignments (%)", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
