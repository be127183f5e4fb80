"""The resume is decided once per job (``checkpoint.plan``): rank 0 reads meta.json, the pickles
and the configs; each rank hashes only its share of the files; a damaged file found by any rank
fails (or, for a resume, passes over the checkpoint on) every rank with the same one line. A
checkpoint whose tensor shapes do not fit the configured model, and a meta.json whose counters
are out of range, are refused before anything is built: one line, exit 2."""

from __future__ import annotations

import builtins
import io
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import pytest

from megatron_ext.checkpoint import manifest
from megatron_ext.checkpoint.store import CheckpointError
from tests.conftest import free_port, run_cli, spawn_workers
from tests.resilience import small_args

WORLD = 3


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """One run with complete checkpoints at steps 2 and 4 (copied per test)."""
    tmp = tmp_path_factory.mktemp("saved")
    proc = run_cli(small_args(tmp, 4, "--set", "checkpoint.save_interval=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


@pytest.fixture
def run(saved, tmp_path) -> Path:
    shutil.copytree(saved, tmp_path / "r")
    return tmp_path / "r"


def _counting_opens(root: Path) -> list[str]:
    """Every file under ``root`` this process opens from now on, by relative name."""
    opened: list[str] = []
    real = builtins.open

    def counted(file, *args, **kwargs):
        if isinstance(file, (str, Path)) and str(file).startswith(str(root)):
            opened.append(Path(file).relative_to(root).as_posix())
        return real(file, *args, **kwargs)

    builtins.open = io.open = counted
    return opened


def _worker(rank: int, port: int, root: str, out: str) -> None:
    from megatron_ext.platform import cpu

    cpu.enable_if_needed()
    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    from megatron_ext.checkpoint import plan
    from megatron_ext.checkpoint.load_model import _config
    from megatron_ext.config.derived import derive

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    root_p = Path(root)
    cfg = _config(root_p / "iter_0000004")
    cfg.checkpoint.save, cfg.checkpoint.load = root, None
    result: dict = {}

    # 1. An intact checkpoint: the same plan everywhere, each file opened by one rank only
    # (rank 0 also reads meta.json, the pickles, the configs).
    opened = _counting_opens(root_p / "iter_0000004")
    steps = derive(cfg).total_steps
    made = plan.make_plan(cfg, steps)
    result["plan"] = [made.action, made.path, made.warnings, made.message]
    result["opened"] = list(opened)
    result["share"] = manifest.share(made.meta, rank, WORLD)
    opened.clear()

    # 2. A shard of rank 1's share damaged: rank 0 and 2 learn it from rank 1.
    newest = root_p / "iter_0000004"
    victim = manifest.share(made.meta, 1, WORLD)[0]
    if rank == 0:
        data = (newest / victim).read_bytes()
        (newest / victim).write_bytes(random.Random(0).randbytes(len(data)))
    dist.barrier()
    try:
        plan.verify_shared(newest, checksums=True)
        result["error"] = None
    except CheckpointError as e:
        result["error"] = str(e)
    result["victim"] = victim

    # 3. The same damage on resume: every rank passes over it to iter 2, with one warning.
    fallback = plan.make_plan(cfg, steps)
    result["fallback"] = [fallback.action, fallback.path, fallback.warnings]
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.slow  # ~40 s on 2 shared cores: three interpreters importing megatron
def test_plan_once_per_job_and_one_verdict(run, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    root = run / "ckpt"
    spawn_workers(_worker, (free_port(), str(root), str(tmp_path)), WORLD, 300, "plan")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    newest = root / "iter_0000004"
    # One decision, the same on every rank.
    assert all(r["plan"] == results[0]["plan"] for r in results)
    assert results[0]["plan"][:2] == ["complete", str(newest)]
    # Every file hashed exactly once in the job; the other ranks open nothing else.
    files = sorted(json.loads((newest / "meta.json").read_text())["files"])
    shares = [r["share"] for r in results]
    assert sorted(f for s in shares for f in s) == files
    for r in (1, 2):
        assert sorted(results[r]["opened"]) == shares[r], results[r]["opened"]
    pickles = [".metadata", "common.pt", "rng/rank_00000.pt"]
    for name in pickles:  # unpickled restricted by rank 0 alone
        assert name in results[0]["opened"]
        assert all(name not in results[r]["opened"] for r in (1, 2) if name not in shares[r])
    # A file damaged in rank 1's share: the same one line on every rank, naming it.
    errors = {r["error"] for r in results}
    assert len(errors) == 1 and f"{results[1]['victim']} does not match its checksum" in (
        errors.pop())
    fallbacks = [r["fallback"] for r in results]
    assert all(f == fallbacks[0] for f in fallbacks)
    action, path, warned = fallbacks[0]
    assert path == str(root / "iter_0000002") and len(warned) == 1
    assert results[1]["victim"] in warned[0] and "resuming from iter_0000002" in warned[0]


def _one_error(proc) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "layout:" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("how", ["checkpoint.load", "resume"])
def test_shape_mismatch_names_every_field_and_exits_2(run, tmp_path, how):
    shapes = ("--set", "model.hidden_size=128", "--set", "model.ffn_hidden_size=256",
              "--set", "moe.num_experts=8")
    if how == "resume":
        args = small_args(run, 4, *shapes)
    else:
        args = small_args(tmp_path / "fresh", 4, "--set", f"checkpoint.load={run}/ckpt", *shapes)
    line = _one_error(run_cli(args))
    for field in ("model.hidden_size (checkpoint 64, config 128)",
                  "model.ffn_hidden_size (checkpoint 128, config 256)",
                  "moe.num_experts (checkpoint 4, config 8)"):
        assert field in line, line


COUNTERS = {  # meta.json edit -> fragment of the one line
    "negative schedule step": (("scheduler", "num_steps"), -5,
                               "scheduler.num_steps must be >= 0, got -5"),
    "huge consumed samples": (("consumed_samples",), 10**18,
                              "consumed_samples must be <= 9007199254740992"),
    "float consumed samples": (("consumed_samples",), 1e18, "consumed_samples is 1e+18"),
    "schedule ahead of the steps": (("scheduler", "num_steps"), 9,
                                    "scheduler.num_steps 9 exceeds step 4"),
    "nan learning rate": (("scheduler", "max_lr"), float("nan"),
                          "scheduler.max_lr must be a finite number"),
}


def _edit_meta(d: Path, keys: tuple, value) -> None:
    meta = json.loads((d / "meta.json").read_text())
    node = meta
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    (d / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("case", list(COUNTERS))
def test_meta_counters_out_of_range_are_refused(run, case):
    keys, value, fragment = COUNTERS[case]
    d = run / "ckpt" / "iter_0000004"
    _edit_meta(d, keys, value)
    with pytest.raises(CheckpointError, match="meta.json is corrupt") as e:
        manifest.read(d, 4)
    assert fragment in str(e.value) and len(str(e.value)) < 300, str(e.value)


def test_meta_counters_out_of_range_exit_2_on_resume(run):
    shutil.rmtree(run / "ckpt" / "iter_0000002")
    _edit_meta(run / "ckpt" / "iter_0000004", ("scheduler", "num_steps"), -5)
    line = _one_error(run_cli(small_args(run, 4)))
    assert "no usable checkpoint" in line and "scheduler.num_steps must be >= 0, got -5" in line
