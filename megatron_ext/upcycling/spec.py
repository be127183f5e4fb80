"""What to upcycle and how: ``UpcycleSpec`` and its checks."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from torch import Tensor

from megatron_ext.conversion.keymaps import Arch
from megatron_ext.errors import UserError

METHODS = ("scratch", "naive", "noise", "drop", "btx")
INDEX_SHARING = ("per_projection", "shared")
ROUTER_INITS = ("uniform_std002", "normal_std002")


class UpcycleError(UserError, ValueError):
    """A bad upcycling request (the message says which setting)."""


def _unread(name: str) -> Tensor:
    raise KeyError(f"{name}: a placeholder btx source is never read")


@dataclass(frozen=True)
class UpcycleSpec:
    """One upcycling recipe. Every random draw comes from ``seed`` (order: see ``upcycle``)."""

    method: str = "drop"
    """scratch | naive | noise (RNU) | drop (Drop-Upcycling) | btx (Branch-Train-MiX)."""
    ratio: float = 0.5
    """Share r of each expert's d_ff neurons re-initialized (drop) or perturbed (noise)."""
    num_experts: int = 8
    top_k: int = 2
    seed: int = 1234
    index_sharing: str = "per_projection"
    """per_projection: a fresh neuron subset per matrix (the published runs);
    shared: one subset per expert for gate, up and down (the paper's equations)."""
    router_init: str = "uniform_std002"
    """uniform_std002: (u - mean(u)) * 0.02 * sqrt(12), u ~ U(0,1); normal_std002: N(0, 0.02)."""
    noise_std: float = 0.02
    """Std of the noise the noise method adds."""
    init_std: float = 0.02
    """Std of Linear/Embedding weights for the scratch method."""
    moe_layers: frozenset[int] | None = None
    """Layers that become MoE; None = all. The others keep their dense MLP."""
    btx_sources: tuple[Callable[[str], Tensor], ...] = field(default=(), compare=False)
    """btx: getters of the other dense models; the input is source 0, these are 1, 2, ..."""

    def __post_init__(self) -> None:
        if self.moe_layers is not None:
            object.__setattr__(self, "moe_layers", frozenset(self.moe_layers))
        object.__setattr__(self, "btx_sources", tuple(self.btx_sources))

    @property
    def num_sources(self) -> int:
        return 1 + len(self.btx_sources)

    def with_placeholder_sources(self, count: int) -> UpcycleSpec:
        """This recipe with ``count`` btx sources that cannot be read: checks the recipe (e.g.
        experts divisible by the sources) before any source is opened."""
        return replace(self, btx_sources=tuple(_unread for _ in range(count)))

    def validate(self, arch: Arch | None = None) -> None:
        """Raise ``UpcycleError`` for the first bad setting (``arch``: the dense input)."""
        if self.method not in METHODS:
            raise UpcycleError(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if not (isinstance(self.ratio, (int, float)) and 0.0 <= self.ratio <= 1.0):
            raise UpcycleError(f"ratio {self.ratio} is outside [0, 1]")
        if self.num_experts < 1:
            raise UpcycleError(f"num_experts {self.num_experts} must be at least 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise UpcycleError(f"top_k {self.top_k} must be in 1..num_experts ({self.num_experts})")
        if self.index_sharing not in INDEX_SHARING:
            raise UpcycleError(f"index_sharing {self.index_sharing!r} is not one of "
                               f"{', '.join(INDEX_SHARING)}")
        if self.router_init not in ROUTER_INITS:
            raise UpcycleError(f"router_init {self.router_init!r} is not one of "
                               f"{', '.join(ROUTER_INITS)}")
        for name in ("noise_std", "init_std"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise UpcycleError(f"{name} {value} must be a positive number")
        if self.seed < 0:
            raise UpcycleError(f"seed {self.seed} must be non-negative")
        if self.method == "btx":
            if not self.btx_sources:
                raise UpcycleError("btx needs at least one other source model besides the input")
            if self.num_experts % self.num_sources:
                raise UpcycleError(f"num_experts {self.num_experts} is not divisible by the "
                                   f"{self.num_sources} btx source models")
        elif self.btx_sources:
            raise UpcycleError(f"btx sources given for method {self.method!r}")
        if self.moe_layers is not None and not self.moe_layers:
            raise UpcycleError("moe_layers is empty")
        if arch is not None:
            if arch.num_experts:
                raise UpcycleError("the input is already an MoE model")
            bad = sorted(i for i in self.moe_layers or () if not 0 <= i < arch.num_layers)
            if bad:
                raise UpcycleError(f"moe_layers {bad} outside 0..{arch.num_layers - 1}")

    def moe_arch(self, arch: Arch) -> Arch:
        """The MoE model this spec makes from dense ``arch``."""
        layers = self.moe_layers if self.moe_layers is not None else range(arch.num_layers)
        return replace(arch, num_experts=self.num_experts, moe_layers=frozenset(layers))

    def function_preserving(self) -> bool:
        """True when the MoE must compute exactly the dense model's function (r = 0 family)."""
        return self.method == "naive" or (self.method in ("drop", "noise") and self.ratio == 0)

    def describe(self) -> dict[str, object]:
        """JSON-able record of the recipe, stored next to the output for provenance."""
        return {
            "method": self.method, "ratio": self.ratio, "num_experts": self.num_experts,
            "top_k": self.top_k, "seed": self.seed, "index_sharing": self.index_sharing,
            "router_init": self.router_init, "noise_std": self.noise_std,
            "init_std": self.init_std,
            "moe_layers": None if self.moe_layers is None else sorted(self.moe_layers),
            "num_sources": self.num_sources,
        }
