"""Routing analysis: metric functions on hand-computed counts, and the CLI end to end."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from megatron_ext.analysis import routing as R
from megatron_ext.cli import routing as routing_cli
from megatron_ext.data.errors import DataError
from tests.conftest import REPO, run_cli

CORPUS = REPO / "data" / "corpus"
MOE_LAYERS = (1, 2, 3)  # the end-to-end run's moe.layer_freq [0, 1, 1, 1]: layer 0 is dense


# ----------------------------------------------------------------------------- metrics


def test_uniform_usage_has_zero_tv_and_max_entropy():
    counts = torch.full((3, 8), 5)
    assert torch.allclose(R.tv_to_mean(counts), torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(R.usage_entropy(counts), torch.full((3,), math.log(8),
                                                              dtype=torch.float64))
    assert torch.allclose(R.top_expert_share(counts), torch.full((3,), 1 / 8,
                                                                 dtype=torch.float64))


def test_disjoint_usage_known_tv():
    # Two domains on disjoint expert pairs: mean = 1/4 on experts 0..3, TV = 1/2 (4 x 1/4 / 2).
    counts = torch.tensor([[10, 10, 0, 0], [0, 0, 7, 7]])
    assert torch.allclose(R.tv_to_mean(counts), torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert torch.allclose(R.usage_entropy(counts), torch.full((2,), math.log(2),
                                                              dtype=torch.float64))
    assert torch.allclose(R.top_expert_share(counts), torch.tensor([0.5, 0.5],
                                                                   dtype=torch.float64))
    # Three domains each on its own expert: mean 1/3 each, TV = (2/3 + 1/3 + 1/3) / 2 = 2/3.
    assert torch.allclose(R.tv_to_mean(torch.eye(3) * 4), torch.full((3,), 2 / 3,
                                                                     dtype=torch.float64))


def test_partial_overlap_and_unequal_domain_sizes():
    # p_A = (.75, .25), p_B = (.5, .5) (B has 100x the tokens: every domain still counts once);
    # mean = (.625, .375); TV = (.125 + .125) / 2 for both.
    counts = torch.tensor([[3, 1], [100, 100]])
    assert torch.allclose(R.tv_to_mean(counts), torch.tensor([0.125, 0.125],
                                                             dtype=torch.float64))
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert R.usage_entropy(counts)[0].item() == pytest.approx(expected)
    assert R.top_expert_share(counts).tolist() == pytest.approx([0.75, 0.5])


def test_metrics_broadcast_over_layers_and_empty_rows():
    layers = torch.stack([torch.full((2, 4), 3), torch.tensor([[6, 0, 0, 0], [0, 6, 0, 0]])])
    assert R.tv_to_mean(layers).flatten().tolist() == pytest.approx([0, 0, 0.5, 0.5])
    empty = R.usage_distribution(torch.zeros(1, 4))
    assert torch.equal(empty, torch.zeros(1, 4, dtype=torch.float64))  # zeros, not NaN
    assert R.usage_entropy(torch.zeros(1, 4)).item() == 0.0


def test_token_router_entropy():
    equal = torch.zeros(5, 8)
    assert torch.allclose(R.token_router_entropy(equal), torch.full((5,), math.log(8)))
    peaked = torch.tensor([[50.0, 0, 0, 0]])
    assert R.token_router_entropy(peaked).item() < 1e-6
    assert R.token_router_entropy(equal, "sigmoid")[0].item() == pytest.approx(math.log(8))
    sums, tokens = torch.tensor([[6.0, 0.0]]), torch.tensor([[3, 0]])
    assert R.mean_token_entropy(sums, tokens).tolist() == [[2.0, 0.0]]


def test_token_batches_and_stream(tmp_path):
    shapes = [tuple(b.shape) for b in R.token_batches(list(range(10)), 4, batch_size=1)]
    assert shapes == [(1, 4), (1, 4), (1, 2)]
    batches = list(R.token_batches(list(range(9)), 3, batch_size=8))
    assert [tuple(b.shape) for b in batches] == [(3, 3)]
    assert batches[0][2].tolist() == [6, 7, 8]

    class CharTokenizer:
        def encode(self, text: str) -> list[int]:
            return [ord(c) for c in text]

    text = tmp_path / "t.txt"
    text.write_text("ab\n" * 1000, encoding="utf-8")
    ids = R.read_token_stream(text, CharTokenizer(), max_tokens=50, piece_chars=16)
    assert len(ids) == 50 and ids[:3] == [97, 98, 10]
    assert len(R.read_token_stream(text, CharTokenizer(), max_tokens=10**6)) == 3000
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00abc")
    for name in ("empty.txt", "bad.txt", "missing.txt"):
        with pytest.raises(DataError):
            R.read_token_stream(tmp_path / name, CharTokenizer(), 10)


def test_summary_markdown_and_heatmap(tmp_path):
    counts = torch.tensor([[[4, 4, 0, 0], [0, 0, 4, 4]], [[2, 2, 2, 2], [2, 2, 2, 2]]])
    rc = R.RoutingCounts(["en", "ja"], [0, 2], counts, torch.tensor([[4.0, 2.0], [8.0, 8.0]]),
                         torch.tensor([[4, 4], [4, 4]]), top_k=2)
    s = R.summarize(rc)
    assert s["average"]["mean_tv"] == pytest.approx(0.25)  # layer 0: 0.5, layer 2: 0
    assert s["per_domain"]["en"]["tv_to_mean"] == pytest.approx(0.25)
    assert s["per_domain"]["ja"]["token_router_entropy"] == pytest.approx((0.5 + 2.0) / 2)
    assert s["per_layer"][0]["top_expert"] == {"en": 0, "ja": 2}
    assert s["per_layer"][1]["layer"] == 2 and s["uniform_entropy"] == pytest.approx(math.log(4))
    json.dumps(s)  # JSON-able
    md = R.render_markdown(s)
    assert "| en | 4 | 0.250 |" in md and "0.295" in md and "0.020" in md and "0.264" in md
    R.plot_heatmap(s["per_layer"][0]["usage"], rc.labels, 0, 2, tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_output_dir_rules(tmp_path):
    tool = routing_cli
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError):
        tool.check_output(foreign)
    previous = tmp_path / "report"
    previous.mkdir()
    (previous / tool.MARKER).write_text("{}")
    (previous / "heatmap_layer9.png").write_text("old")
    tool.check_output(previous)  # a previous report may be replaced
    new = tmp_path / ".report.tmp-x"
    new.mkdir()
    (new / tool.MARKER).write_text('{"new": 1}')
    tool.install(new, previous)
    assert sorted(p.name for p in previous.iterdir()) == [tool.MARKER]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "report"]  # no leftovers
    with pytest.raises(DataError):
        tool.parse_layers("0,5", [0, 1, 2, 3])
    assert tool.parse_layers("3,0", [0, 1, 2, 3]) == [0, 3]


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_routing_cli_end_to_end(tmp_path, capsys):
    """A run whose first layer is dense (MoE layers 1, 2, 3), then the routing tool on it: the
    training metrics, the heatmaps and both reports number the layers alike (0-based)."""
    # One thread per process (run_cli's default): on a busy 2-core machine two OpenMP threads
    # per process spin-wait and run several times slower.
    ckpt, out = tmp_path / "ckpt", tmp_path / "routing"
    proc = run_cli(["pretrain_moe.py", "--config", "configs/tiny-cpu.yaml",
                    "--set", "train.train_steps=4", "--set", "train.eval_interval=0",
                    "--set", "schedule.warmup_steps=2", "--set", "moe.layer_freq=[0,1,1,1]",
                    "--set", f"checkpoint.save={ckpt}", "--set", "checkpoint.save_interval=0",
                    "--set", f"logging.output_dir={tmp_path / 'run'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    texts = ["--text", f"en={CORPUS / 'en_shakespeare.txt'}", f"ja={CORPUS / 'ja_neko.txt'}"]
    proc = run_cli(["-m", "megatron_ext.cli.routing", "--checkpoint", str(ckpt), *texts,
                    "--output", str(out), "--max-tokens", "1000"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mean TV" in proc.stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"heatmap_layer{i}.png" for i in MOE_LAYERS] + ["routing.json", "routing.md"]
    for i in MOE_LAYERS:
        assert (out / f"heatmap_layer{i}.png").read_bytes()[:4] == b"\x89PNG"
    s = json.loads((out / "routing.json").read_text())
    assert s["layers"] == [layer["layer"] for layer in s["per_layer"]] == list(MOE_LAYERS)
    # the training metrics (router statistics and expert similarity) use the same numbers
    record = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open())
              if r["kind"] == "train"][-1]
    for metric in ("load_e0", "entropy", "expert_cos_mean"):
        logged = sorted(int(k.split("/")[1].removeprefix("layer")) for k in record
                        if k.startswith("moe/layer") and k.endswith(f"/{metric}"))
        assert logged == list(MOE_LAYERS), (metric, logged)
    assert {"average", "per_domain", "per_layer", "paper", "checkpoint", "tokenizer"} <= set(s)
    assert s["num_experts"] == 8 and s["top_k"] == 2 and s["domains"] == ["en", "ja"]
    avg = s["average"]
    assert 0.0 < avg["mean_tv"] <= 0.5  # two domains: TV to their mean is at most 1/2
    assert 0.5 < avg["usage_entropy"] <= math.log(8) + 1e-9
    assert 1 / 8 <= avg["top_expert_share"] <= 0.5
    assert 0.0 < avg["token_router_entropy"] <= math.log(8) + 1e-6
    for layer in s["per_layer"]:
        # dropless top-2: every token contributes exactly two assignments
        assert [sum(row) for row in layer["counts"]] == [2 * 1000, 2 * 1000]
    assert s["per_domain"]["ja"]["tokens"] == 1000
    md = (out / "routing.md").read_text()
    assert "| **average** |" in md and "0.295" in md and "| ja | 1,000 |" in md
    assert "MoE layers (0-based) 1, 2, 3." in md
    assert re.findall(r"^\| (\d+) \| ", md, re.MULTILINE) == ["1", "2", "3"]  # per-layer rows

    # bad input: one line on stderr, exit 2, nothing written, the previous report untouched.
    # One real process (import-time warnings would add lines), the rest in-process (fast).
    bad = run_cli(["-m", "megatron_ext.cli.routing", "--checkpoint", str(ckpt), *texts,
                   "--output", str(out), "--layers", "0,7"])
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.splitlines() == [
        "error: --layers: unknown layer(s) [0, 7]; the checkpoint's MoE layers are 1,2,3"]
    tool = routing_cli
    for argv in (["--checkpoint", str(tmp_path / "nope"), *texts],
                 ["--checkpoint", str(ckpt), "--text", f"x={tmp_path / 'missing.txt'}"]):
        assert tool.run_cli(tool.main, [*argv, "--output", str(tmp_path / "other")]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert not (tmp_path / "other").exists()
    assert sorted(p.name for p in out.iterdir()) == names
