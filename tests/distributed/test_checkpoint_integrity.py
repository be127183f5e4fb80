"""Corrupt or incomplete checkpoints are found before use; incompatible configs are refused;
non-finite steps are skipped and counted, and past the limit the run stops cleanly."""

import shutil

import pytest

from megatron_ext.checkpoint.store import CheckpointError, find_resumable
from tests.conftest import run_cli
from tests.forkrun import run_clis
from tests.resilience import losses_by_step, small_args


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run with complete checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("saved")
    proc = run_cli(small_args(tmp, 4, "--set", "checkpoint.save_interval=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


@pytest.fixture
def ckpt(saved, tmp_path):
    shutil.copytree(saved / "ckpt", tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _shard(path):
    return sorted(path.glob("*.distcp"))[0]


def test_intact_resumes_latest(ckpt):
    found, warnings = find_resumable(ckpt)
    assert found.name == "iter_0000004" and warnings == []


@pytest.mark.parametrize("damage, reason", [
    (lambda p: _shard(p).write_bytes(_shard(p).read_bytes()[:100]), "truncated or damaged"),
    (lambda p: _shard(p).unlink(), "missing file __0_"),
    (lambda p: (p / ".metadata").unlink(), "missing file .metadata"),
    (lambda p: (p / "meta.json").unlink(), "meta.json missing"),
    (lambda p: (p / "meta.json").write_text("{not json"), "meta.json is corrupt"),
])
def test_damaged_newest_falls_back_with_a_warning(ckpt, damage, reason):
    damage(ckpt / "iter_0000004")
    found, warnings = find_resumable(ckpt)
    assert found.name == "iter_0000002"
    assert len(warnings) == 1 and reason in warnings[0] and "iter_0000004" in warnings[0]


def test_latest_pointing_at_nothing(ckpt):
    (ckpt / "latest").write_text("iter_0000099\n")
    found, warnings = find_resumable(ckpt)
    assert found.name == "iter_0000004"
    assert "points at iter_0000099, which does not exist" in warnings[0]


def test_nothing_usable_is_an_error(ckpt):
    for d in ("iter_0000002", "iter_0000004"):
        _shard(ckpt / d).unlink()
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        find_resumable(ckpt)


def _with_nan_hook(args: list[str]) -> list[str]:
    """The same run through tests/nan_injection.py, which makes the loss NaN at $NAN_STEPS."""
    assert args[0] == "pretrain_moe.py"
    return ["tests/nan_injection.py", *args[1:]]


@pytest.fixture(scope="module")
def cli(saved, tmp_path_factory):
    """The CLI cases below, each on its own directory (a copy of ``saved`` where it resumes),
    forked from one driver (tests.forkrun): one import of torch and megatron for the five."""
    tmp = tmp_path_factory.mktemp("cli")
    for name in ("falls back", "no usable", "incompatible"):
        shutil.copytree(saved, tmp / name)
    shard = _shard(tmp / "falls back/ckpt/iter_0000004")
    shard.write_bytes(shard.read_bytes()[:-10])
    for d in ("iter_0000002", "iter_0000004"):
        (tmp / "no usable/ckpt" / d / ".metadata").unlink()
    calls = {
        "falls back": (small_args(tmp / "falls back", 4), {}),
        "no usable": (small_args(tmp / "no usable", 5), {}),
        "incompatible": (small_args(tmp / "incompatible", 6, "--set", "model.hidden_size=128",
                                    "--set", "moe.num_experts=8"), {}),
        "nan skipped": (_with_nan_hook(small_args(tmp / "nan skipped", 5, "--set",
                                                  "train.max_skipped_steps=2")),
                        {"NAN_STEPS": "3"}),
        "nan stop": (_with_nan_hook(small_args(tmp / "nan stop", 6, "--set",
                                               "train.max_skipped_steps=1", "--set",
                                               "checkpoint.save_interval=2")),
                     {"NAN_STEPS": "3,4"}),
    }
    procs = run_clis([c for c, _ in calls.values()], tmp / "driver",
                     envs=[e for _, e in calls.values()])
    return {name: (tmp / name, proc) for name, proc in zip(calls, procs)}


def test_cli_falls_back_and_resumes(cli):
    _, proc = cli["falls back"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "truncated or damaged" in proc.stderr
    assert "iter_0000002 at step 2" in proc.stdout


def test_cli_no_usable_checkpoint_exits_2(cli):
    _, proc = cli["no usable"]
    assert proc.returncode == 2
    assert "error: no usable checkpoint in" in proc.stderr


def test_incompatible_config_is_refused_with_fields(cli):
    _, proc = cli["incompatible"]
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()[-1]
    assert "is incompatible with this config" in err
    assert "model.hidden_size (checkpoint 64, config 128)" in err
    assert "moe.num_experts (checkpoint 4, config 8)" in err


def test_nan_step_is_skipped_and_counted(cli):
    run, proc = cli["nan skipped"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 3: non-finite loss (nan)" in proc.stderr and "step skipped (1/2)" in proc.stderr
    assert "skipped 1" in proc.stdout.splitlines()[-1]
    losses = losses_by_step(run / "run")
    assert losses[3] == "nan" and all(isinstance(losses[s], float) for s in (4, 5))


def test_too_many_nan_steps_stop_without_overwriting_a_good_checkpoint(cli):
    run, proc = cli["nan stop"]
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "exceed train.max_skipped_steps=1" in proc.stderr
    assert (run / "ckpt/latest").read_text().strip() == "iter_0000002"
    assert not (run / "ckpt/iter_0000004").exists()
