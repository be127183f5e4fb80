"""A checkpoint is hashed once per job, not once per step that looks at it: a tool reads its
config and loads its weights on one verification (``load_model.checkpoint_config``), and the
writer's pruning after a resume reuses the resume plan's verdicts (``ResumePlan.verified``).
A file changed after its verdict is verified again. Hashes are counted by a wrapper around
``manifest.file_sum`` (the one function that reads a file to hash it), on a real checkpoint
converted in-process from the tiny HF Llama of tests/conftest.py."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest

from megatron_ext.checkpoint import manifest
from megatron_ext.checkpoint.store import CheckpointError

ITER0 = "iter_0000000"
LAYOUT = {"world_size": 1, "tensor": 1, "pipeline": 1, "expert": 1,
          "distributed_optimizer": False}


@pytest.fixture(scope="module")
def converted(hf_llama, tmp_path_factory) -> Path:
    """Our checkpoint root (``iter_0000000``, ``latest``) of the tiny HF Llama."""
    from megatron_ext.conversion.hf_io import HFCheckpoint
    from megatron_ext.conversion.keymaps import arch_from_hf_config, hf_to_mcore
    from megatron_ext.conversion.mcore_io import config_from_hf, write_mcore_checkpoint

    hf = HFCheckpoint(hf_llama)
    stream = hf_to_mcore(hf.get, arch_from_hf_config(hf.config))
    return write_mcore_checkpoint(stream, config_from_hf(hf.config),
                                  tmp_path_factory.mktemp("converted") / "mcore")


def _count_hashes(monkeypatch) -> Counter:
    """Each file hashed from now on, by path, with how often."""
    hashed: Counter = Counter()
    real = manifest.file_sum

    def counted(path):
        hashed[Path(path)] += 1
        return real(path)

    monkeypatch.setattr(manifest, "file_sum", counted)
    return hashed


def _under(hashed: Counter, d: Path) -> dict[str, int]:
    return {p.relative_to(d).as_posix(): n for p, n in hashed.items() if d in p.parents}


def _garbage(path: Path) -> None:
    """Same size, other bytes: only a checksum sees it."""
    path.write_bytes(random.Random(0).randbytes(path.stat().st_size))


@pytest.mark.parametrize("where", ["root", "iter"])
def test_a_tool_hashes_each_file_once(converted, monkeypatch, where):
    """mcore_to_hf's reader (as generate and routing): checkpoint_config, then load_model."""
    from megatron_ext.conversion.mcore_io import read_mcore_checkpoint

    d = converted / ITER0
    hashed = _count_hashes(monkeypatch)
    _, keys, _, _ = read_mcore_checkpoint(converted if where == "root" else d)
    files = json.loads((d / "meta.json").read_text())["files"]
    assert keys and _under(hashed, d) == dict.fromkeys(files, 1)


def test_a_file_changed_after_the_verification_is_verified_again(converted, tmp_path):
    from megatron_ext.checkpoint.load_model import checkpoint_config, load_model
    from megatron_ext.conversion.mcore_io import single_process

    root = Path(shutil.copytree(converted, tmp_path / "mcore"))
    verified = checkpoint_config(root)
    _garbage(next((root / ITER0).glob("__*.distcp")))
    with single_process(None), pytest.raises(CheckpointError, match="does not match its checksum"):
        load_model(verified)


def _copy_at(src: Path, root: Path, step: int) -> Path:
    """``src`` as the checkpoint of ``step`` (meta.json, which no checksum covers, says so)."""
    d = Path(shutil.copytree(src, root / f"iter_{step:07d}"))
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps(dict(meta, step=step)))
    return d


def test_pruning_after_a_resume_rehashes_nothing_the_plan_judged(converted, tmp_path,
                                                                  monkeypatch):
    """keep_last=2; checkpoints 1, 2, 3 with 3 damaged: the plan passes over 3 and resumes 2.
    The save of 4 prunes 1 without hashing 2 or 3 again (before: 2 in full, 3 up to its
    damage). A checkpoint damaged after the plan judged it is hashed again, and not counted."""
    from megatron_ext.checkpoint import plan
    from megatron_ext.checkpoint.load_model import _config, load_model
    from megatron_ext.checkpoint.saver import Saver
    from megatron_ext.checkpoint.store import TrainState, _prune
    from megatron_ext.config.derived import derive
    from megatron_ext.config.loader import to_dict
    from megatron_ext.conversion.mcore_io import single_process

    root = tmp_path / "ckpt"
    its = {step: _copy_at(converted / ITER0, root, step) for step in (1, 2, 3)}
    (root / "latest").write_text(f"{its[3].name}\n")
    _garbage(its[3] / "common.pt")
    cfg = _config(its[2])
    cfg.checkpoint.save, cfg.checkpoint.load = str(root), None
    made = plan.make_plan(cfg, derive(cfg).total_steps)
    assert (made.action, made.path) == (plan.RESUME, str(its[2]))
    assert {name: ok for name, (ok, _) in made.verified.items()} == {its[3].name: False,
                                                                     its[2].name: True}
    saver = Saver(root, keep_last=2, fully_reshardable=True, async_save=False,
                  known=made.verified)
    with single_process(None):
        _, model = load_model(its[2])
        hashed = _count_hashes(monkeypatch)
        saver.save(TrainState(step=4), model, None, to_dict(cfg), LAYOUT)
    assert sorted(p.name for p in root.glob("iter_*")) == [its[2].name, its[3].name,
                                                           "iter_0000004"]
    assert hashed and all(".tmp_iter_0000004" in p.parts for p in hashed), sorted(hashed)

    hashed.clear()
    _garbage(next(its[2].glob("__*.distcp")))
    _prune(root, 2, saver.known)
    assert _under(hashed, its[2]) and not _under(hashed, its[3]), sorted(hashed)
    assert saver.known[its[2].name][0] is False and its[2].is_dir()  # 4 alone counts: none go
