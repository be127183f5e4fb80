"""Streaming validation of an upcycled model: every tensor is checked as it is produced, against
the dense model read again from its own checkpoint, so memory stays at about one layer.

What is checked, per method (E experts, F = d_ff neurons, k = floor(r * F)):

- tensors that are not experts (embedding, attention, norms, lm_head, the MLP of a dense
  layer): bit-equal to the dense tensor; btx: the sources' fp32 mean, cast back; scratch: norms
  all ones, the rest mean 0 and std ``init_std``.
- routers: shape [E, H], finite, mean 0 and std 0.02 (both inits).
- naive / btx experts: bit-equal to the dense (btx: the source's) MLP.
- drop / noise experts: the neurons (rows of gate/up, columns of down) are matched to the
  dense ones by content (an exact integer fingerprint of a few words proposes a dense neuron,
  ``DenseNeurons``; a bit-exact comparison decides): exactly F - k match, each dense neuron
  at most once, and a position matched in two projections maps to the same dense neuron (one
  permutation per expert; ``shared`` index sharing: the same positions re-initialized in all
  three). The k new neurons are judged against the k dense neurons nobody matched (the slice
  the upcycler drew from): drop, mean and std of that slice; noise, its mean and
  sqrt(std^2 + noise_std^2).
- scratch experts: mean 0, std ``init_std``.
- function-preserving recipes (naive, r = 0): a probe batch through each MoE layer (Mixtral
  routing: softmax, top-k, weights renormalized to 1) equals the dense MLP's output.

Statistical tolerances (n values): the sample mean of Normal(m, s) is off by s / sqrt(n) (one
sigma), the sample std by s / sqrt(2n); we allow 6 / sqrt(n) and 10 / sqrt(n) in units of s
(6 sigma for the mean; the std bound leaves room for a non-normal dense slice in noise, whose
kurtosis widens it), plus 2^-8 for the bf16 rounding of each sample (2^-9 relative at most).
"""

from __future__ import annotations

import math
import re
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from megatron_ext.conversion.keymaps import HF_DENSE_MLP, Arch, hf_layer, hf_shapes
from megatron_ext.model.compare import ValidationError
from megatron_ext.platform.background import consume_behind
from megatron_ext.upcycling.neuron_match import (
    DenseNeurons,
    Prints,
    as_rows,
    as_words,
    fingerprint_weights,
    same_bits,
)
from megatron_ext.upcycling.neuron_stats import Scratch
from megatron_ext.upcycling.spec import UpcycleSpec

Getter = Callable[[str], Tensor]
ROLES = ("gate", "up", "down")
_W_ROLE = {"w1": "gate", "w3": "up", "w2": "down"}
_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
_ROUTER = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight")
_BF16_SLACK = 2.0 ** -8
_PROBE_TOKENS = 4
_PROBE_TOLERANCE = 1e-4  # relative to max(1, max |dense output|), as the logit check
_STATS_CHUNK = 1 << 20  # values per fp32 chunk of the statistics: 4 MB, stays in cache
_ONE_PASS_MAX_MEAN = 0.25  # |mean| / std up to which ``std_mean`` sums squares in one pass


def _fp32_chunks(values: Tensor, rows: Tensor | None, scratch: Scratch) -> Iterator[Tensor]:
    """``values`` (or its rows ``rows`` of a contiguous 2-D ``values``: gathered as wide
    integers) in fp32, ``_STATS_CHUNK`` values at a time into one reused buffer."""
    if rows is None:
        flat = values.reshape(-1)
        for start in range(0, flat.numel(), _STATS_CHUNK):
            part = flat[start:start + _STATS_CHUNK]
            yield scratch.get(tuple(part.shape), torch.float32).copy_(part)
        return
    words = as_words(values)
    step = max(1, _STATS_CHUNK // max(1, values.shape[1]))
    for start in range(0, len(rows), step):
        at = rows[start:start + step]
        got = torch.index_select(words, 0, at,
                                 out=scratch.get((len(at), words.shape[1]), words.dtype))
        yield scratch.get((len(at), values.shape[1]), torch.float32).copy_(got.view(values.dtype))


def std_mean(values: Tensor, scratch: Scratch | None = None,
             rows: Tensor | None = None) -> tuple[float, float]:
    """Unbiased std and mean of ``values`` (or of its ``rows``, indices into a contiguous 2-D
    ``values``), converted to fp32 a cache-sized chunk at a time (2x faster than whole): each
    chunk's sum and norm (``vector_norm``; error ~1e-4 of a 1M-value chunk), added in fp64.
    The sums' combination multiplies the norms' error by 1 + (mean / std)^2, so beyond |mean| =
    ``_ONE_PASS_MAX_MEAN`` std a second pass adds the norms of the deviations from the mean.
    ``scratch``: the chunk buffers (its fp32 and integer buffers are overwritten)."""
    scratch = Scratch() if scratch is None else scratch
    n = values.numel() if rows is None else len(rows) * values.shape[1]
    s1 = s2 = 0.0
    for x in _fp32_chunks(values, rows, scratch):
        s1 += x.sum().item()
        s2 += torch.linalg.vector_norm(x).item() ** 2
    mean = s1 / n if n else math.nan
    if n < 2:
        return 0.0, mean
    var = (s2 - s1 * s1 / n) / (n - 1)
    if mean * mean <= _ONE_PASS_MAX_MEAN ** 2 * var:  # (false for NaN: the second pass says so)
        return math.sqrt(var), mean
    dev = sum(torch.linalg.vector_norm(x.sub_(mean)).item() ** 2
              for x in _fp32_chunks(values, rows, scratch))
    return math.sqrt(dev / (n - 1)), mean


def check_stats(name: str, values: Tensor, mean: float, std: float,
                scratch: Scratch | None = None, rows: Tensor | None = None) -> None:
    """ValidationError unless ``values`` (or its ``rows``, as ``std_mean``) look drawn with
    this mean and std (module docstring)."""
    n = values.numel() if rows is None else len(rows) * values.shape[1]
    got_std, got_mean = std_mean(values, scratch, rows)
    mean_tol = std * (6 / math.sqrt(n) + _BF16_SLACK)
    std_tol = std * (10 / math.sqrt(n) + _BF16_SLACK)
    if not (math.isfinite(got_mean) and abs(got_mean - mean) <= mean_tol):
        raise ValidationError(f"{name}: mean {got_mean:.6g} of {n} values, expected {mean:.6g} "
                              f"+- {mean_tol:.2g}")
    if not (math.isfinite(got_std) and abs(got_std - std) <= std_tol):
        raise ValidationError(f"{name}: std {got_std:.6g} of {n} values, expected {std:.6g} "
                              f"+- {std_tol:.2g}")


class StreamCheck:
    """``tap(stream)`` yields the upcycler's (name, tensor) pairs unchanged while checking them
    (module docstring); the first failure raises ``ValidationError`` naming layer and tensor."""

    def __init__(self, sources: list[Getter], arch: Arch, spec: UpcycleSpec) -> None:
        self.sources, self.arch, self.spec = sources, arch, spec
        self.expected = hf_shapes(spec.moe_arch(arch))
        self.moe_layers = spec.moe_arch(arch).moe_layers
        self.k = math.floor(spec.ratio * arch.ffn_hidden_size)
        g = torch.Generator().manual_seed(0)  # fixed: the checks do not depend on spec.seed
        self.weights = fingerprint_weights(2 * arch.hidden_size, g)  # fp64 rows: 2H words
        self.probe_x = torch.randn(_PROBE_TOKENS, arch.hidden_size, generator=g)
        self._prints: dict[int, Prints] = {}  # per element size of the dense MLP
        self.seen: set[str] = set()
        self.layers_checked = 0
        self.experts_checked = 0
        self._layer: int | None = None
        self._mlp: dict[str, Tensor] | None = None  # the current layer's dense MLP
        self._mlp_source = 0
        self._neurons: dict[str, DenseNeurons] | None = None
        self._pending: dict[int, dict[str, Tensor]] = {}
        self._probe: tuple[Tensor, Tensor, Tensor] | None = None  # route_TE, out_TH, want_TH
        self._probe_parts: dict[int, Tensor] = {}  # per expert, summed in expert order
        self._local = threading.local()  # per thread: the scratch buffers of its checks
        self._dense_rows = Scratch()  # the layer's dense down as rows (``DenseNeurons``)
        self._helper: ThreadPoolExecutor | None = None  # while ``tap`` runs
        self._running: deque[tuple[int, Future]] = deque()  # (expert, its check) on the helper

    # --- the stream -----------------------------------------------------------------------
    def tap(self, stream: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
        """``stream`` unchanged, checked on a worker thread (``platform.background``) so the
        upcycler goes on meanwhile; a failure is raised a few tensors later at the latest.

        Experts are checked two at a time, by that thread and a helper (``_dispatch``): with
        one, the check was the upcycler's slowest thread on two cores (a validated 8x3.7B run's
        main thread waited on it ~20% of the time, while a core sat idle)."""
        with ThreadPoolExecutor(1, thread_name_prefix="expert_check") as helper:
            self._helper = helper
            try:
                yield from consume_behind(stream, lambda item: self.check(*item), name="check")
                self.finish()
            finally:
                self._helper = None
                for _, future in self._running:
                    future.cancel()
                self._running.clear()

    def check(self, name: str, t: Tensor) -> None:
        if name not in self.expected or name in self.seen:
            raise ValidationError(f"{name}: unexpected or repeated tensor in the output")
        if tuple(t.shape) != self.expected[name]:
            raise ValidationError(f"{name}: shape {list(t.shape)}, expected "
                                  f"{list(self.expected[name])}")
        self.seen.add(name)
        layer = hf_layer(name)
        if layer != self._layer:
            self._close_layer()
            self._layer = layer
        if (e := _EXPERT.fullmatch(name)) is not None:
            self._expert_tensor(int(e.group(1)), int(e.group(2)), _W_ROLE[e.group(3)], name, t)
        elif _ROUTER.fullmatch(name):
            self._router(name, t)
        else:
            self._plain(name, t)

    def finish(self) -> None:
        self._close_layer()
        missing = [n for n in self.expected if n not in self.seen]
        if missing:
            raise ValidationError(f"{missing[0]}: never produced ({len(missing)} missing)")

    @property
    def _scratch(self) -> Scratch:
        """This thread's buffer of an expert's down as rows (``as_rows``)."""
        return self._thread_scratch("rows")

    @property
    def _stats(self) -> Scratch:
        """This thread's statistics' chunks: never the buffer of down's rows."""
        return self._thread_scratch("stats")

    def _thread_scratch(self, what: str) -> Scratch:
        if not hasattr(self._local, what):
            setattr(self._local, what, Scratch())
        return getattr(self._local, what)

    def summary(self) -> str:
        probe = " and a probe batch per MoE layer" if self.spec.function_preserving() else ""
        return (f"streaming validation: {len(self.seen)} tensors, {self.experts_checked} experts "
                f"in {self.layers_checked} layers checked against the dense model{probe}; PASS")

    # --- tensors that are not experts -----------------------------------------------------
    def _plain(self, name: str, t: Tensor) -> None:
        if self.spec.method == "scratch":
            if name.endswith("norm.weight"):
                if not bool((t == 1).all()):
                    raise ValidationError(f"{name}: a norm weight that is not all ones (scratch)")
            else:
                check_stats(name, t, 0.0, self.spec.init_std, self._stats)
            return
        want = self.sources[0](name)
        if self.spec.method == "btx":  # the upcycler's own formula: fp32 mean, cast back
            acc = want.to(torch.float32, copy=True)  # never add into a source's own tensor
            for source in self.sources[1:]:
                acc += source(name).float()
            want = (acc / len(self.sources)).to(want.dtype)
        if not same_bits(t, want):
            what = "the btx sources' mean" if self.spec.method == "btx" else "the dense tensor"
            raise ValidationError(f"{name}: differs from {what}")

    def _router(self, name: str, t: Tensor) -> None:
        if not bool(torch.isfinite(t).all()):
            raise ValidationError(f"{name}: non-finite router weights")
        check_stats(name, t, 0.0, 0.02, self._stats)
        if self.spec.function_preserving():
            logits_TE = self.probe_x @ t.float().t()
            top_w, top_i = torch.softmax(logits_TE, dim=-1).topk(self.spec.top_k, dim=-1)
            route_TE = torch.zeros_like(logits_TE)
            route_TE.scatter_(1, top_i, top_w / top_w.sum(dim=-1, keepdim=True))
            want_TH = _mlp(self.probe_x, self._dense_mlp(self._layer, 0))
            self._probe = (route_TE, torch.zeros_like(want_TH), want_TH)
        if self.spec.method in ("drop", "noise") and self._layer is not None:
            # now, not at the first expert: the upcycler is still preparing the layer (its
            # neuron sums, the first draws), so this thread would otherwise wait, then lag
            self._dense_neurons(self._layer)

    # --- experts --------------------------------------------------------------------------
    def _expert_tensor(self, layer: int, expert: int, role: str, name: str, t: Tensor) -> None:
        weights = self._pending.setdefault(expert, {})
        weights[role] = t
        if len(weights) < len(ROLES):
            return
        del self._pending[expert]
        # what the check reads of the dense layer, made here: the threads only read it
        method = self.spec.method
        dense: dict | None = None
        if method in ("naive", "btx"):
            dense = self._dense_mlp(layer, self._source(expert))
        elif method in ("drop", "noise"):
            dense = self._dense_neurons(layer)
        route_T = None if self._probe is None else self._probe[0][:, expert]
        self._dispatch(expert, (layer, expert, weights, dense, route_T))

    def _dispatch(self, expert: int, args: tuple) -> None:
        """``_check_expert(*args)`` on the helper when it is free, else on this thread: two
        experts at most in memory, and an earlier expert's failure is raised first."""
        if self._running and self._running[0][1].done():
            self._record(*self._oldest())
        if self._helper is not None and not self._running:
            self._running.append((expert, self._helper.submit(self._check_expert, *args)))
            return
        try:
            part = self._check_expert(*args)
        except Exception:
            while self._running:
                self._record(*self._oldest())
            raise
        self._record(expert, part)

    def _oldest(self) -> tuple[int, Tensor | None]:
        expert, future = self._running.popleft()
        return expert, future.result()

    def _record(self, expert: int, probe_part: Tensor | None) -> None:
        self.experts_checked += 1
        if probe_part is not None:
            self._probe_parts[expert] = probe_part

    def _source(self, expert: int) -> int:
        """The source whose MLP ``expert`` copies (btx; 0 otherwise)."""
        if self.spec.method != "btx":
            return 0
        return expert // (self.spec.num_experts // len(self.sources))

    def _check_expert(self, layer: int, expert: int, weights: dict[str, Tensor],
                      dense: dict | None, route_T: Tensor | None) -> Tensor | None:
        """ValidationError unless the expert is right; on a thread of its own under ``tap``,
        so it reads only its arguments and its thread's buffers. ``dense``: the dense MLP
        (naive, btx) or its ``DenseNeurons`` (drop, noise). ``route_T``: the probe tokens'
        routing weights to this expert when the layer has a probe; then the expert's part of
        the probe's output is returned (summed at the layer's end)."""
        spec = self.spec
        names = {r: f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight"
                 for w, r in _W_ROLE.items()}
        if spec.method in ("naive", "btx"):
            for role in ROLES:
                if not same_bits(weights[role], dense[role]):
                    raise ValidationError(
                        f"{names[role]}: differs from the dense MLP's {role}_proj (source "
                        f"{self._source(expert)}), expected an exact copy")
        elif spec.method == "scratch":
            for role in ROLES:
                check_stats(names[role], weights[role], 0.0, spec.init_std, self._stats)
        else:
            self._check_permuted(dense, weights, names)
        if route_T is not None and bool((route_T > 0).any()):
            return route_T[:, None] * _mlp(self.probe_x, weights)
        return None

    def _check_permuted(self, neurons: dict[str, DenseNeurons], weights: dict[str, Tensor],
                        names: dict[str, str]) -> None:
        """drop / noise: see the module docstring."""
        matched: dict[str, Tensor] = {}
        for role in ROLES:
            dense, name = neurons[role], names[role]
            rows = as_rows(weights[role], role, self._scratch)
            idx = dense.match(rows)
            fresh = (idx < 0).nonzero().squeeze(1)
            if len(fresh) != self.k:
                raise ValidationError(
                    f"{name}: {len(fresh)} of {len(idx)} neurons differ from every dense neuron "
                    f"of {role}_proj, expected floor(r * d_ff) = {self.k}")
            used = idx[idx >= 0]
            if dense.unique and used.unique().numel() != used.numel():
                raise ValidationError(f"{name}: a dense neuron of {role}_proj appears twice")
            if self.k:
                self._check_fresh(name, rows, fresh, dense, used)
            matched[role] = idx
        for a, b in (("gate", "up"), ("gate", "down"), ("up", "down")):
            both = (matched[a] >= 0) & (matched[b] >= 0)
            if all(neurons[r].unique for r in (a, b)) and not torch.equal(
                    matched[a][both], matched[b][both]):
                raise ValidationError(f"{names[b]}: its neurons are permuted differently from "
                                      f"{names[a]} (one permutation per expert)")
            if self.spec.index_sharing == "shared" and not torch.equal(
                    matched[a] < 0, matched[b] < 0):
                raise ValidationError(f"{names[b]}: re-initialized neurons differ from {names[a]}"
                                      " (index_sharing shared: one set for all three)")

    def _check_fresh(self, name: str, rows: Tensor, fresh: Tensor, dense: DenseNeurons,
                     used: Tensor) -> None:
        dropped = torch.ones(dense.rows.shape[0], dtype=torch.bool)
        dropped[used] = False
        std, mean = dense.sums.std_mean(dropped.nonzero().squeeze(1))
        if self.spec.method == "noise":
            std = math.sqrt(std ** 2 + self.spec.noise_std ** 2)
        check_stats(f"{name} (the {len(fresh)} re-initialized neurons)", rows, mean, std,
                    self._stats, fresh)

    # --- the dense layer ------------------------------------------------------------------
    def _dense_mlp(self, layer: int | None, source: int) -> dict[str, Tensor]:
        """The dense MLP of ``layer`` in ``source``: read once per layer (btx: per source)."""
        if self._mlp is None or source != self._mlp_source:
            self._mlp = {r: self.sources[source](HF_DENSE_MLP[r].format(layer=layer))
                         for r in ROLES}
            self._mlp_source = source
        return self._mlp

    def prints_for(self, w: Tensor) -> Prints:
        """The prints for neurons of ``w``'s dtype: short columns fixed per element size."""
        size = w.element_size()
        if size not in self._prints:
            g = torch.Generator().manual_seed(size)
            self._prints[size] = Prints(self.weights, self.arch.hidden_size, size, g)
        return self._prints[size]

    def _dense_neurons(self, layer: int) -> dict[str, DenseNeurons]:
        if self._neurons is None:
            mlp = self._dense_mlp(layer, 0)
            self._neurons = {r: DenseNeurons(mlp[r], r, self.prints_for(mlp[r]),
                                             self._dense_rows) for r in ROLES}
        return self._neurons

    def _close_layer(self) -> None:
        while self._running:
            self._record(*self._oldest())
        if self._pending:
            expert = min(self._pending)
            raise ValidationError(f"model.layers.{self._layer}: expert {expert} incomplete "
                                  f"({', '.join(sorted(self._pending[expert]))} only)")
        if self._probe is not None:
            _, out_TH, want_TH = self._probe
            for expert in sorted(self._probe_parts):  # the order one thread would add them in
                out_TH += self._probe_parts[expert]
            diff = (out_TH - want_TH).abs().max().item()
            tol = _PROBE_TOLERANCE * max(1.0, want_TH.abs().max().item())
            if not diff <= tol:
                raise ValidationError(f"model.layers.{self._layer}: the MoE layer's output on the "
                                      f"probe batch differs from the dense MLP's by {diff:.3e} "
                                      f"(<= {tol:.2e} required)")
        if self._layer in self.moe_layers:
            self.layers_checked += 1
        self._probe, self._mlp, self._neurons = None, None, None
        self._probe_parts = {}


def _mlp(x_TH: Tensor, w: dict[str, Tensor]) -> Tensor:
    """SwiGLU MLP in fp32, one projection converted at a time."""
    h_TF = torch.nn.functional.silu(x_TH @ w["gate"].float().t()) * (x_TH @ w["up"].float().t())
    return h_TF @ w["down"].float().t()
