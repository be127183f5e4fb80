"""The upcycler: dense Llama tensors in, Mixtral tensors out, one tensor at a time.

``upcycle`` is the single entry point for every method (scratch, naive, noise, drop, btx); it
works in HF naming. ``upcycle_mcore`` runs the same function on megatron-core names by
converting on the fly. At most two layers' dense MLPs (drop / noise read the next MoE layer's
once the current one's draws are done, to start its draws) and a few experts are alive at a
time, so memory does not grow with the model.

Random draws come from ONE ``torch.Generator`` (CPU) seeded once with ``spec.seed``, consumed in
this order, which is a property of the function and not of how the caller streams its tensors:

1. Router weights of every MoE layer, ascending layer index, [E, H] each (fp32):
   ``uniform_std002``: ``torch.rand`` then ``(u - mean(u)) * 0.02 * sqrt(12)``;
   ``normal_std002``: ``torch.normal(0, 0.02)``.
   (All routers come first, as in the reference implementation.)
2. Then layer by layer, ascending; within a layer, in output order:
   - drop / noise, MoE layers, expert e = 0..E-1:
     ``perm = randperm(F)``; then with ``per_projection`` for gate (w1), down (w2), up (w3) in
     this order (the reference's order): ``idx = randperm(F)[:k]`` and the slice's samples
     (``torch.normal``, slice shape: [k, H] for gate/up, [H, k] for down); with ``shared``:
     one ``idx = randperm(F)[:k]`` after ``perm``, then the samples for gate, down, up.
     k = floor(r * F). drop samples ``Normal(mean, std)`` of the selected slice (stats in fp64
     from per-neuron sums, ``neuron_stats``, rounded to fp32; unbiased std; the reference
     computes them in the model dtype); noise samples
     ``Normal(0, noise_std)`` and adds them (fp32, then cast).
   - scratch: ``torch.normal(0, init_std)`` for every non-norm tensor, in output order
     (experts: w1, w3, w2). Norm weights are ones.
   - naive / btx draw nothing after the routers.

Output order = ``keymaps.hf_shapes(moe_arch)`` order: embedding; per layer input norm, q, k, v,
o, post-attention norm, then router + experts (w1, w3, w2) or the dense gate, up, down; final
norm; lm_head. Shape legend: E experts, H hidden, F d_ff, k re-initialized neurons.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import replace

import torch
from torch import Tensor

from megatron_ext.conversion.keymaps import (
    HF_DENSE_MLP,
    HF_EMBED,
    HF_EXPERT,
    HF_FINAL_NORM,
    HF_INPUT_NORM,
    HF_K,
    HF_LM_HEAD,
    HF_O,
    HF_POST_ATTN_NORM,
    HF_Q,
    HF_ROUTER,
    HF_V,
    Arch,
    StreamGetter,
    check_key_set,
    fetch,
    hf_shapes,
    hf_to_mcore,
    mcore_shapes,
    mcore_to_hf,
)
from megatron_ext.upcycling.neuron_stats import NeuronSums
from megatron_ext.upcycling.perturb import Buffers, ExpertStream, mlp_sums
from megatron_ext.upcycling.spec import UpcycleSpec

Getter = Callable[[str], Tensor]
_ROLES = ("gate", "up", "down")  # output order of an expert's matrices
_LAYER_TENSORS = (HF_INPUT_NORM, HF_Q, HF_K, HF_V, HF_O, HF_POST_ATTN_NORM)


def upcycle(
    get_dense: Getter, dense_keys: Iterable[str], arch: Arch, spec: UpcycleSpec
) -> Iterator[tuple[str, Tensor]]:
    """Stream the Mixtral tensors ``spec`` makes from the dense Llama model behind ``get_dense``.

    ``dense_keys`` is checked against ``arch`` up front (strict: missing or extra keys raise), and
    so is ``spec``; nothing is read until the caller iterates. btx sources are
    ``spec.btx_sources`` (the input is source 0). Copied tensors are the getter's own objects;
    do not modify yielded tensors in place. A drop/noise expert's memory is reused for a later
    expert once nothing refers to it any more (``neuron_stats.Recycler``): keep the tensor (or a
    view of it), not a raw pointer, for as long as you need its values.
    """
    spec.validate(arch)
    check_key_set(dense_keys, hf_shapes(arch), "dense checkpoint")
    return _Upcycler(get_dense, arch, spec).run()


def upcycle_mcore(
    get_dense: Getter,
    dense_keys: Iterable[str],
    arch: Arch,
    spec: UpcycleSpec,
    padded_vocab_size: int | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """``upcycle`` on megatron-core names: dense mcore tensors in, MoE mcore tensors out.

    Same draws, same values as the HF path. btx sources must be mcore getters too. Padded
    vocabulary rows are cut on the way in and re-padded with zeros on the way out.
    """
    spec.validate(arch)
    check_key_set(dense_keys, mcore_shapes(arch, padded_vocab_size), "dense mcore checkpoint")

    def as_hf(get: Getter) -> Getter:
        return StreamGetter(mcore_to_hf(get, arch, padded_vocab_size=padded_vocab_size))

    hf_spec = replace(spec, btx_sources=tuple(as_hf(s) for s in spec.btx_sources))
    hf_stream = upcycle(as_hf(get_dense), hf_shapes(arch), arch, hf_spec)
    return hf_to_mcore(StreamGetter(hf_stream), spec.moe_arch(arch),
                       padded_vocab_size=padded_vocab_size)


_MOE_NAME = re.compile(
    r"model\.layers\.(\d+)\.block_sparse_moe\.(?:gate|experts\.\d+\.(w[123]))\.weight")


def dense_source_key(moe_name: str) -> str:
    """The dense tensor an output tensor derives from (its dtype is the output's dtype)."""
    m = _MOE_NAME.fullmatch(moe_name)
    if m is None:
        return moe_name
    role = {"w1": "gate", "w3": "up", "w2": "down", None: "gate"}[m.group(2)]
    return HF_DENSE_MLP[role].format(layer=m.group(1))


def output_layout(
    arch: Arch, spec: UpcycleSpec, dtype_of: Callable[[str], torch.dtype]
) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every output tensor, in output order; ``dtype_of`` answers for
    dense names (e.g. from the safetensors headers), so files can be planned before any read."""
    return [(name, shape, dtype_of(dense_source_key(name)))
            for name, shape in hf_shapes(spec.moe_arch(arch)).items()]


def init_router(num_experts: int, hidden: int, how: str, g: torch.Generator) -> Tensor:
    """Router weight [E, H] in fp32 with std 0.02 (both options)."""
    if how == "uniform_std002":
        u_EH = torch.rand(num_experts, hidden, generator=g)
        # Centred on the sample mean; U(0,1) has std 1/sqrt(12), hence the factor.
        return (u_EH - u_EH.mean()) * 0.02 * math.sqrt(12)
    return torch.normal(0.0, 0.02, (num_experts, hidden), generator=g)


class _Upcycler:
    def __init__(self, get_dense: Getter, arch: Arch, spec: UpcycleSpec) -> None:
        self.arch, self.spec = arch, spec
        self.moe_arch = spec.moe_arch(arch)
        self.sources: list[Getter] = [get_dense, *spec.btx_sources]
        self.shapes = hf_shapes(arch)
        self.g = torch.Generator(device="cpu").manual_seed(spec.seed)
        self.buffers = Buffers()  # reused from layer to layer
        # drop / noise: the next MoE layer's dense MLP and its experts' stream, started as soon
        # as the generator is free (``_start``), and the one after's MLP and neuron sums, made
        # ahead so that its draws can start at once (``_prepare``)
        self._next: tuple[int, dict[str, Tensor], ExpertStream] | None = None
        self._ready: tuple[int, dict[str, Tensor], dict[str, NeuronSums] | None] | None = None

    def _fetch(self, name: str, source: int = 0) -> Tensor:
        what = "dense checkpoint" if source == 0 else f"btx source {source}"
        return fetch(self.sources[source], name, self.shapes[name], what)

    def _random(self, name: str, like: Tensor) -> Tensor:
        if name.endswith("norm.weight"):
            return torch.ones_like(like)
        sample = torch.normal(0.0, self.spec.init_std, tuple(like.shape), generator=self.g)
        return sample.to(like.dtype)

    def _plain(self, name: str) -> Tensor:
        """A tensor that is not an expert: copied, averaged (btx) or random (scratch)."""
        t = self._fetch(name)
        if self.spec.method == "scratch":
            return self._random(name, t)
        if self.spec.method == "btx":
            # a copy: an fp32 source's .float() is the getter's own (maybe cached) tensor
            acc = t.to(torch.float32, copy=True)
            for s in range(1, len(self.sources)):
                acc += self._fetch(name, s).float()
            return (acc / len(self.sources)).to(t.dtype)
        return t

    def run(self) -> Iterator[tuple[str, Tensor]]:
        try:
            yield from self._run()
        finally:  # a consumer that stops early stops a stream started ahead too
            if self._next is not None:
                self._next[2].close()

    def _run(self) -> Iterator[tuple[str, Tensor]]:
        routers = {
            layer: init_router(self.spec.num_experts, self.arch.hidden_size, self.spec.router_init,
                               self.g)
            for layer in sorted(self.moe_arch.moe_layers)
        }
        if self.spec.method in ("drop", "noise") and 0 in self.moe_arch.moe_layers:
            self._start(0)  # its draws run while the embedding and the attention are written
        yield HF_EMBED, self._plain(HF_EMBED)
        for layer in range(self.arch.num_layers):
            for template in _LAYER_TENSORS:
                name = template.format(layer=layer)
                yield name, self._plain(name)
            if layer in routers:
                yield from self._moe_layer(layer, routers.pop(layer))
            else:
                for role in _ROLES:
                    name = HF_DENSE_MLP[role].format(layer=layer)
                    yield name, self._plain(name)
        yield HF_FINAL_NORM, self._plain(HF_FINAL_NORM)
        yield HF_LM_HEAD, self._plain(HF_LM_HEAD)

    def _moe_layer(self, layer: int, router_EH: Tensor) -> Iterator[tuple[str, Tensor]]:
        experts: Iterator[dict[str, Tensor]]
        if self.spec.method in ("drop", "noise"):
            if self._next is None or self._next[0] != layer:
                self._start(layer)
            assert self._next is not None
            _, mlp, experts = self._next
            self._next = None
            if layer + 1 in self.moe_arch.moe_layers and self._ready is None:
                self._ready = self._prepare(layer + 1)
        else:
            names = {role: HF_DENSE_MLP[role].format(layer=layer) for role in _ROLES}
            mlp = {role: self._fetch(name) for role, name in names.items()}
            experts = self._copied_experts(names, mlp, {r: t.dtype for r, t in mlp.items()})
        yield HF_ROUTER.format(layer=layer), router_EH.to(mlp["gate"].dtype)
        with closing(experts):  # a consumer that stops early stops the draws too
            for expert, weights in enumerate(experts):
                for role in _ROLES:
                    yield HF_EXPERT[role].format(layer=layer, expert=expert), weights[role]

    def _prepare(self, layer: int) -> tuple[int, dict[str, Tensor], dict[str, NeuronSums] | None]:
        """drop / noise: ``layer``'s dense MLP and, for drop, its neuron sums (each dense neuron
        summed once per layer, for every expert's statistics). For an MoE layer right after
        another, made as the one before starts (so, one layer ahead of the output, before its
        attention): made when its draws could start, they kept the generator idle ~0.1 s per
        8x3.7B layer."""
        mlp = {role: self._fetch(HF_DENSE_MLP[role].format(layer=layer)) for role in _ROLES}
        sums = mlp_sums(mlp) if self.spec.method == "drop" and self.spec.ratio > 0 else None
        return layer, mlp, sums

    def _start(self, layer: int) -> None:
        """drop / noise: start ``layer``'s experts (their draws on a worker thread): layer 0's
        before anything is written, an MoE layer right after another as soon as that one's last
        draws are taken (the generator is free), so that they run while its last expert is
        built, checked and written (the generator was otherwise idle there, ~0.4 s per 8x3.7B
        layer), any other when it is reached."""
        ready = self._ready if self._ready is not None and self._ready[0] == layer else None
        self._ready = None
        _, mlp, sums = ready or self._prepare(layer)

        def drawn() -> None:
            if layer + 1 in self.moe_arch.moe_layers:
                self._start(layer + 1)

        stream = ExpertStream(mlp, self.spec, self.g, sums, self.buffers, self.spec.num_experts,
                              on_drawn=drawn)
        self._next = (layer, mlp, stream)

    def _copied_experts(self, names: dict[str, str], mlp: dict[str, Tensor],
                        dtypes: dict[str, torch.dtype]) -> Iterator[dict[str, Tensor]]:
        """scratch, naive and btx experts, in order."""
        mlp_source = 0
        per_source = self.spec.num_experts // len(self.sources)
        for expert in range(self.spec.num_experts):
            if self.spec.method == "btx" and expert // per_source != mlp_source:
                # Experts are grouped by source, so each source's MLP is read once per layer.
                mlp_source = expert // per_source
                mlp = {role: self._fetch(name, mlp_source).to(dtypes[role])
                       for role, name in names.items()}
            if self.spec.method == "scratch":
                yield {role: self._random(names[role], mlp[role]) for role in _ROLES}
            else:  # naive, btx: exact copies
                yield {role: mlp[role].clone() for role in _ROLES}
