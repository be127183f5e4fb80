"""A training config's view of upcycling: the recipe its ``upcycling`` and ``moe`` sections
name, and whether a dense model has the shape its ``model`` section names. Shared by
``moe-upcycle --config`` and the paper recipe (``megatron_ext.experiments.recipe``), so both
upcycle the same way for the same config."""

from __future__ import annotations

from megatron_ext.config.derived import moe_layer_pattern
from megatron_ext.config.schema import Config
from megatron_ext.conversion.keymaps import Arch
from megatron_ext.conversion.mcore_io import arch_from_config
from megatron_ext.upcycling.spec import UpcycleSpec

# The dense model's shape as the config names it (keymaps.Arch field -> config field).
SHAPE_FIELDS = {"num_layers": "model.num_layers", "hidden_size": "model.hidden_size",
                "num_heads": "model.num_attention_heads", "num_kv_heads": "model.num_kv_heads",
                "head_dim": "head dim (model.hidden_size / model.num_attention_heads)",
                "ffn_hidden_size": "model.ffn_hidden_size", "vocab_size": "model.vocab_size"}


def config_values(cfg: Config) -> dict:
    """The UpcycleSpec fields the config supplies (moe-upcycle's flags of the same names)."""
    u, pattern = cfg.upcycling, moe_layer_pattern(cfg.model, cfg.moe)
    return {"method": u.method, "ratio": u.ratio, "seed": u.seed,
            "index_sharing": u.index_sharing, "router_init": u.router_init,
            "noise_std": u.noise_std, "num_experts": cfg.moe.num_experts, "top_k": cfg.moe.top_k,
            # None = every layer, as when --moe-layers is not given
            "moe_layers": None if all(pattern) else frozenset(
                i for i, moe in enumerate(pattern) if moe)}


def spec_from_config(cfg: Config) -> UpcycleSpec:
    """The recipe the config names; scratch weights get the model's own init std."""
    return UpcycleSpec(**config_values(cfg), init_std=cfg.model.init_method_std)


def shape_differences(cfg: Config, dense: Arch) -> list[str]:
    """``field config-value vs dense-value`` for each way the dense model's shape differs from
    the config's model (empty: it fits)."""
    want = arch_from_config(cfg)
    return [f"{name} {getattr(want, f)} vs {getattr(dense, f)}"
            for f, name in SHAPE_FIELDS.items() if getattr(want, f) != getattr(dense, f)]
