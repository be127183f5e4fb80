"""Reading a checkpoint never runs code (``megatron_ext.checkpoint.safe_pickle``).

Every pickle in a real checkpoint of the tiny model (``.metadata``, ``common.pt``,
``rng/rank_00000.pt`` and the sharded objects inside the ``.distcp`` shards) is replaced by
payloads that create a marker file when unpickled: ``os.system`` / ``builtins.eval`` /
``subprocess.Popen`` via ``__reduce__``, a dotted attribute of an allowed module, a genuine
metadata tree or state dict with a forbidden object stuffed into it. Each is padded to the size
meta.json records (checked with checksums off, the size check alone passing) and, separately,
written with meta.json rewritten to match, as an attacker who controls the whole directory would.
The payloads are shown to be live (an unrestricted load creates the marker); no restricted read
ever does: ``verify()`` refuses them naming the file and the object, megatron-core's own entry
points refuse them, resume falls back to the older checkpoint with one warning (exit 2 with one
line when none is left), and ``checkpoint.load``, ``mcore_to_hf`` and the routing tool exit 2
with one line. Legitimate checkpoints still load through the restricted readers.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from megatron_ext.checkpoint import manifest, safe_pickle
from megatron_ext.checkpoint import store as ckpt
from tests.conftest import run_cli
from tests.forkrun import run_clis
from tests.resilience import small_args

ITER2, ITER4 = "iter_0000002", "iter_0000004"
RNG = "rng/rank_00000.pt"
DOTTED = "torch.distributed.checkpoint.filesystem.os.system"


class _Call:
    """Pickles as ``fn(*args)``: what a malicious ``__reduce__`` makes the unpickler run."""

    def __init__(self, fn: Callable, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _calls(marker: Path) -> dict[str, _Call]:
    return {
        "os.system": _Call(os.system, f"touch {marker}"),
        "builtins.eval": _Call(eval, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.Popen": _Call(subprocess.Popen, ["touch", str(marker)]),
    }


def _dotted_global(marker: Path) -> bytes:
    """Protocol-4 pickle calling ``os.system`` reached as the dotted attribute ``os.system`` of
    ``torch.distributed.checkpoint.filesystem`` (an allowed module; plain pickle walks the dots)."""
    def text(s: str) -> bytes:
        b = s.encode()
        return b"\x8c" + bytes([len(b)]) + b  # SHORT_BINUNICODE

    cmd = f"touch {marker}".encode()
    return (b"\x80\x04" + text("torch.distributed.checkpoint.filesystem") + text("os.system")
            + b"\x93" + b"X" + struct.pack("<I", len(cmd)) + cmd + b"\x85R.")


def _torch_bytes(obj) -> bytes:
    # torch's legacy format is a pickle stream: trailing padding is ignored, as in .metadata.
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def metadata_payloads(good: Path, marker: Path) -> dict[str, bytes]:
    out = {name: pickle.dumps(call, protocol=4) for name, call in _calls(marker).items()}
    out["dotted attribute"] = _dotted_global(marker)
    md = safe_pickle.read_metadata_file(good / ".metadata")
    md.all_local_plans = []  # room for the payload within the recorded size
    md.planner_data = {"innocent": _Call(os.system, f"touch {marker}")}
    out["stuffed metadata"] = pickle.dumps(md, protocol=4)
    return out


def torch_payloads(good: Path, rel: str, marker: Path) -> dict[str, bytes]:
    out = {name: _torch_bytes({"x": call}) for name, call in _calls(marker).items()}
    real = safe_pickle.load_torch_file(good / rel, rel)  # the genuine state, plus one object
    out["stuffed state"] = _torch_bytes(
        {**real, "extra": _Call(eval, f"open({str(marker)!r}, 'w').close()")})
    return out


def object_payloads(marker: Path) -> dict[str, bytes]:
    return {"os.system": _torch_bytes([_Call(os.system, f"touch {marker}")]),
            "builtins.eval": _torch_bytes([_Call(eval, f"open({str(marker)!r}, 'w').close()")]),
            "FP8 extra state": _torch_bytes([torch.frombuffer(bytearray(pickle.dumps(
                _Call(os.system, f"touch {marker}"))), dtype=torch.uint8)])}


def _object_slot(path: Path) -> tuple[str, str, int, int]:
    """(fqn, shard file, offset, length) of the first sharded object in checkpoint ``path``."""
    md = safe_pickle.read_metadata_file(path / ".metadata")
    for index, info in md.storage_data.items():
        if "_extra_state" in index.fqn:
            return index.fqn, info.relative_path, info.offset, info.length
    raise AssertionError("no sharded object in the checkpoint")


def plant(path: Path, target: str, payload: bytes, rewrite_manifest: bool) -> str:
    """Write ``payload`` into checkpoint ``path`` at the same size; returns the file's name.
    ``target``: ".metadata", "common.pt", RNG, or "object" (a sharded object in a shard)."""
    if target == "object":
        _, rel, offset, length = _object_slot(path)
    else:
        rel, offset, length = target, 0, (path / target).stat().st_size
    assert len(payload) <= length, (target, len(payload), length)
    with open(path / rel, "r+b") as f:
        f.seek(offset)
        f.write(payload + b"\0" * (length - len(payload)))
    if rewrite_manifest:
        meta = json.loads((path / "meta.json").read_text())
        entry = meta["files"][rel]
        meta["files"][rel] = (manifest.file_sum(path / rel) if isinstance(entry, dict)
                              else (path / rel).stat().st_size)
        (path / "meta.json").write_text(json.dumps(meta, indent=1))
    return rel


def _executed(marker: Path, wait: float = 1.0) -> bool:
    """Whether ``marker`` appears within ``wait`` s (Popen's child writes it a moment later)."""
    deadline = time.monotonic() + wait
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return marker.exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A real 4-step run saving iter_0000002 and iter_0000004 (optimizer included)."""
    tmp = tmp_path_factory.mktemp("pickle_safety")
    r = run_cli(small_args(tmp, 4, "--set", "checkpoint.save_interval=2"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (tmp / "ckpt" / ITER2).is_dir() and (tmp / "ckpt" / ITER4).is_dir()
    return tmp / "ckpt"


@pytest.fixture
def root(trained: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _cases(good: Path, marker: Path) -> list[tuple[str, str, bytes]]:
    cases = [(".metadata", n, p) for n, p in metadata_payloads(good, marker).items()]
    for rel in ("common.pt", RNG):
        cases += [(rel, n, p) for n, p in torch_payloads(good, rel, marker).items()]
    return cases + [("object", n, p) for n, p in object_payloads(marker).items()]


def test_payloads_are_live(trained: Path, tmp_path: Path) -> None:
    """Each payload runs its code when read the way upstream reads that file (so the refusals
    below are refusals of working exploits)."""
    marker = tmp_path / "executed"
    for target, name, payload in _cases(trained / ITER4, marker):
        if name == "FP8 extra state":  # Transformer Engine: pickle.loads of the tensor's bytes
            tensor = torch.load(io.BytesIO(payload), weights_only=True)[0]
            pickle.loads(tensor.numpy().tobytes())
        elif target == ".metadata":
            pickle.loads(payload)
        else:
            torch.load(io.BytesIO(payload), weights_only=False)
        assert _executed(marker), (target, name)
        marker.unlink()


@pytest.mark.parametrize("rewrite_manifest", [False, True], ids=["padded", "manifest-rewritten"])
def test_verify_refuses_every_payload(trained: Path, tmp_path: Path,
                                      rewrite_manifest: bool) -> None:
    marker = tmp_path / "executed"
    for i, (target, name, payload) in enumerate(_cases(trained / ITER4, marker)):
        path = tmp_path / f"case{i}"
        shutil.copytree(trained / ITER4, path)
        rel = plant(path, target, payload, rewrite_manifest)
        # Padded only: with checksums on the manifest already refuses it; off, the size check
        # passes and the restricted reading is what stands in the way.
        with pytest.raises(ckpt.CheckpointError) as err:
            ckpt.verify(path, checksums=rewrite_manifest)
        msg = str(err.value)
        assert str(path / rel) in msg and "\n" not in msg, (target, name, msg)
        if name in ("os.system", "builtins.eval", "subprocess.Popen", "dotted attribute"):
            expected = {"os.system": "posix.system", "dotted attribute": DOTTED}.get(name, name)
            assert f"refusing to unpickle {expected}" in msg, (target, name, msg)
        assert not _executed(marker, wait=0), (target, name)
    assert not _executed(marker)


def test_malformed_metadata_of_allowed_classes(trained: Path, tmp_path: Path) -> None:
    """Allowed classes in the wrong shape are refused too (not a traceback inside megatron)."""
    md = safe_pickle.read_metadata_file(trained / ITER4 / ".metadata")
    md.all_local_plans = []
    next(iter(md.storage_data.values())).relative_path = "../../outside.distcp"
    for name, obj in (("not_metadata", torch.Size([1, 2])), ("path_escape", md)):
        path = tmp_path / name
        shutil.copytree(trained / ITER4, path)
        plant(path, ".metadata", pickle.dumps(obj, protocol=4), True)
        with pytest.raises(ckpt.CheckpointError, match="not a valid checkpoint metadata file"):
            ckpt.verify(path)


def test_megatron_entry_points_are_restricted(root: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """megatron-core's own readers, called directly (no ``verify``), go through the restricted
    ones; a legitimate checkpoint still loads through them."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    assert mcore_torch._get_filesystem_reader is safe_pickle._filesystem_reader
    good = root / ITER2
    assert dist_checkpointing.load_tensors_metadata(str(good))
    assert "optimizer" in dist_checkpointing.load_common_state_dict(str(good))

    marker, bad = tmp_path / "executed", root / ITER4
    plant(bad, ".metadata", pickle.dumps(_calls(marker)["os.system"]), True)
    plant(bad, "common.pt", torch_payloads(good, "common.pt", marker)["builtins.eval"], True)
    # The opt-out environment variable must not reopen megatron's common.pt load.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    for read in (dist_checkpointing.load_tensors_metadata,
                 load_sharded_metadata,
                 dist_checkpointing.load_common_state_dict):
        with pytest.raises(ckpt.CheckpointError, match="refusing to unpickle"):
            read(str(bad))
    planner = mcore_torch.MCoreLoadPlanner()
    planner.flatten_state_dict, planner.state_dict = False, {}
    item = ReadItem(LoadItemType.BYTE_IO, MetadataIndex("x._extra_state/shard_0_1"),
                    torch.Size([0]), MetadataIndex("x._extra_state/shard_0_1"),
                    torch.Size([0]), torch.Size([0]))
    for payload in object_payloads(marker).values():
        with pytest.raises(ckpt.CheckpointError):
            planner.load_bytes(item, io.BytesIO(payload))
    planner.load_bytes(item, io.BytesIO(_torch_bytes([None])))  # what our layers store
    assert planner.state_dict == {"x._extra_state/shard_0_1": [None]}
    assert not _executed(marker)


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stdout[-1500:], r.stderr)
    return lines[0]


def test_resume_falls_back_then_exits_2(root: Path, tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    plant(root / ITER4, ".metadata", pickle.dumps(_calls(marker)["os.system"]), True)
    r = run_cli(small_args(root.parent, 4, "--set", "checkpoint.save_interval=2"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    warnings = [line for line in (r.stdout + r.stderr).splitlines() if "refusing" in line]
    assert len(warnings) == 1 and ITER4 in warnings[0] and "posix.system" in warnings[0], warnings
    assert f"resuming from {ITER2}" in warnings[0]
    assert "resumed from" in r.stdout and not _executed(marker)

    # Now every checkpoint is poisoned (the rerun saved iter_4 afresh: poison it again).
    plant(root / ITER4, RNG, torch_payloads(root / ITER2, RNG, marker)["subprocess.Popen"], True)
    plant(root / ITER2, "common.pt", torch_payloads(root / ITER2, "common.pt", marker)[
        "builtins.eval"], True)
    r = run_cli(small_args(root.parent, 6))
    line = _one_error_line(r)
    assert "no usable checkpoint" in line and "refusing to unpickle" in line, line
    assert not _executed(marker)


def test_tools_and_checkpoint_load_exit_2(root: Path, tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    bad = root / ITER4
    plant(bad, ".metadata", _dotted_global(marker), True)
    runs = {
        "checkpoint.load": small_args(tmp_path / "fresh", 4, "--set", f"checkpoint.load={bad}"),
        "mcore_to_hf": ["-m", "megatron_ext.cli.mcore_to_hf", "--input", str(bad),
                        "--output", str(tmp_path / "hf")],
        "routing": ["-m", "megatron_ext.cli.routing", "--checkpoint", str(bad), "--text",
                    f"en={bad / 'config.yaml'}", "--output", str(tmp_path / "routing")],
    }
    # one driver for the three (tests.forkrun): one import of torch and megatron
    for what, proc in zip(runs, run_clis(list(runs.values()), tmp_path / "driver")):
        line = _one_error_line(proc)
        assert f"refusing to unpickle {DOTTED}" in line and ".metadata" in line, (what, line)
    assert not _executed(marker)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "routing").exists()
