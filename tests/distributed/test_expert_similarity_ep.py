"""Expert-similarity metrics do not depend on the parallel layout: on one Drop-Upcycled
checkpoint (moe-upcycle, mcore output), two gloo processes compute them at
EP = 2 (experts sharded: maps all-gathered), EP = 1 (expert-DP = 2) and TP = 2 (expert-TP = 2:
each rank holds half of every expert's neurons, maps all-reduced) and get the same values
within 1e-6 (fp32 maps, fp64 Gram; only the summation order differs)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli, torchrun

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from megatron.core import parallel_state
    from megatron_ext.checkpoint.load_model import load_model
    from megatron_ext.platform.dist import shutdown
    from megatron_ext.training.callbacks.expert_similarity import expert_similarity

    if __name__ == "__main__":
        out = {}
        for name, layout in (("ep2", dict(expert_parallel=2)), ("ep1", {}),
                             ("tp2", dict(tensor_parallel=2))):
            _, model = load_model(sys.argv[1], **layout)
            out[name] = expert_similarity(model)
            parallel_state.destroy_model_parallel()  # the process group stays for the next
        rank = torch.distributed.get_rank()
        shutdown()
        with open(f"{sys.argv[2]}/rank{rank}.json", "w") as f:  # rank > 0 prints nothing
            json.dump(out, f)
""")


@pytest.mark.slow  # two CLI runs: ~45 s idle, ~60 s on 2 shared cores
def test_same_values_at_ep1_ep2_tp2(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dense, moe = tmp_path / "dense", tmp_path / "moe"
    LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=128,
                                 vocab_size=256)).save_pretrained(dense)
    r = run_cli(["-m", "megatron_ext.cli.upcycle", "--input", str(dense), "--output", str(moe),
                 "--output-format", "mcore", "--method", "drop", "--ratio", "0.5",
                 "--num-experts", "4", "--top-k", "2", "--skip-validation"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    script = tmp_path / "similarity.py"
    script.write_text(SCRIPT)
    r = torchrun(2, [str(script), str(moe), str(tmp_path)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert results[0] == results[1]  # every rank logs the same
    want = results[0]["ep1"]
    assert len(want) == 3 * 2 + 1 and 0.0 < want["moe/expert_cos_mean"] < 0.5
    for layout in ("ep2", "tp2"):
        got = results[0][layout]
        assert sorted(got) == sorted(want)
        assert all(abs(got[k] - want[k]) <= 1e-6 for k in want), (layout, got, want)
