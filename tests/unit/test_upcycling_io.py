"""HF checkpoint I/O: header checks, planned shard writing, staged output directories."""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_ext.conversion.hf_io import (
    INDEX_NAME,
    HFCheckpoint,
    ShardedWriter,
    parse_size,
    read_safetensors_header,
    staged_dir,
)
from megatron_ext.conversion.keymaps import ConversionError
from megatron_ext.platform import direct_io


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(100, 10 + i, generator=g).to(torch.bfloat16) for i in range(6)}


def test_header_checks(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(_tensors(), path)
    assert read_safetensors_header(path)["t3"].shape == (100, 13)
    raw = path.read_bytes()
    for cut, match in ((4, "truncated"), (20, "truncated"), (len(raw) - 1, "truncated")):
        path.write_bytes(raw[:cut])
        with pytest.raises(ConversionError, match=match):
            read_safetensors_header(path)
    path.write_bytes(raw + b"\0")
    with pytest.raises(ConversionError, match="trailing"):
        read_safetensors_header(path)
    n = struct.unpack("<Q", raw[:8])[0]
    path.write_bytes(raw[:8] + b"{" * n + raw[8 + n:])
    with pytest.raises(ConversionError, match="corrupt"):
        read_safetensors_header(path)


def test_writer_plans_shards_and_accepts_any_order(tmp_path: Path) -> None:
    tensors = _tensors()
    layout = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = ShardedWriter(tmp_path, layout, max_shard_bytes=6000)
    for name in reversed(list(tensors)):
        writer.write(name, tensors[name])
    writer.finish()
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors.values())
    (tmp_path / "config.json").write_text("{}")
    ckpt = HFCheckpoint(tmp_path)  # our reader, with its checks
    loaded = {}
    for f in files:
        loaded.update(load_file(tmp_path / f))  # and the reference reader
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t) and torch.equal(ckpt.get(name), t)


def test_writer_single_shard_and_misuse(tmp_path: Path) -> None:
    tensors = _tensors()
    layout = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = ShardedWriter(tmp_path, layout, max_shard_bytes=10**9)
    with pytest.raises(ConversionError, match="unexpected"):
        writer.write("nope", torch.zeros(1))
    with pytest.raises(ConversionError, match="planned"):
        writer.write("t0", torch.zeros(100, 10))
    writer.write("t0", tensors["t0"])
    with pytest.raises(ConversionError, match="twice"):
        writer.write("t0", tensors["t0"])
    with pytest.raises(ConversionError, match="t1 never written"):
        writer.finish()
    writer.close()
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / INDEX_NAME).exists()


def test_checkpoint_dir_checks(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="config.json"):
        HFCheckpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConversionError, match="model.safetensors"):
        HFCheckpoint(tmp_path)
    save_file(_tensors(), tmp_path / "a.safetensors")
    index = {"weight_map": {"t0": "a.safetensors", "t1": "b.safetensors"}}
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="b.safetensors is missing"):
        HFCheckpoint(tmp_path)
    index["weight_map"] = {"t0": "a.safetensors"}
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="disagree about t1"):
        HFCheckpoint(tmp_path)


def test_parse_size() -> None:
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MB") == 5 * 10**8
    assert parse_size("1GiB") == 2**30 and parse_size("123") == 123
    for bad in ("", "two GB", "-1GB", "5XB"):
        with pytest.raises(ConversionError):
            parse_size(bad)


def test_staged_dir_leaves_nothing_on_error_and_replaces_on_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_dir(out, overwrite=False) as tmp:
            (tmp / "x").write_text("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with staged_dir(out, overwrite=False) as tmp:
        (tmp / "x").write_text("1")
    with pytest.raises(ConversionError, match="exists"):
        with staged_dir(out, overwrite=False):
            pass
    with staged_dir(out, overwrite=True) as tmp:
        (tmp / "y").write_text("2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["y"]


def test_writer_starts_tensor_data_on_a_block_and_writes_aligned_tensors_in_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each shard's data starts at a multiple of ``ALIGN`` (the header padded with spaces), so
    tensors that start on a page in memory, written in file order, skip the copy into the
    O_DIRECT buffer; both safetensors and our reader read the same tensors back."""
    import mmap

    monkeypatch.setattr(direct_io, "IN_PLACE_MIN", 2 * direct_io.ALIGN)
    in_place: list[int] = []
    real_close = direct_io.SequentialFile.close

    def close(self, discard: bool = False) -> None:
        in_place.append(self.in_place)
        real_close(self, discard)

    monkeypatch.setattr(direct_io.SequentialFile, "close", close)
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i, rows in enumerate([64, 3, 64, 128]):  # 3 rows: not a whole block, the rest are
        t = torch.randn(rows, 256, generator=g).to(torch.bfloat16)
        page = torch.frombuffer(mmap.mmap(-1, t.numel() * 2), dtype=torch.bfloat16)
        tensors[f"t{i}"] = page.view(t.shape).copy_(t)  # page-aligned memory
    layout = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = ShardedWriter(tmp_path, layout, max_shard_bytes=10**9)
    for name, t in tensors.items():
        writer.write(name, t)
    writer.finish()
    raw = (tmp_path / "model.safetensors").read_bytes()
    assert (8 + struct.unpack("<Q", raw[:8])[0]) % direct_io.ALIGN == 0
    (tmp_path / "config.json").write_text("{}")
    ckpt, loaded = HFCheckpoint(tmp_path), load_file(tmp_path / "model.safetensors")
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t) and torch.equal(ckpt.get(name), t)
    probe = direct_io.SequentialFile(tmp_path / "probe")
    direct = probe.direct
    probe.close(discard=True)
    if direct:  # t0 in place; t2 and t3 sit 3 rows past a block: buffered, unlike t0
        assert in_place[0] >= tensors["t0"].numel() * 2


def test_reading_a_layer_asks_the_kernel_for_the_next_one(tmp_path: Path) -> None:
    """``HFCheckpoint.get`` of a layer's tensor has the next layer's bytes read into the page
    cache in the background (the memory-mapped reads of a cold file are page faults otherwise);
    a tensor outside the layers asks for layer 0; never more than one layer ahead."""
    g = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(256, 1024, generator=g)}
    for layer in range(3):
        for role in ("gate", "up"):  # 8 MiB each: far beyond the kernel's own read-ahead
            tensors[f"model.layers.{layer}.mlp.{role}_proj.weight"] = torch.randn(
                1024, 2048, generator=g)
    (tmp_path / "config.json").write_text("{}")
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    ckpt = HFCheckpoint(tmp_path)

    def cached(layer: int) -> float:
        infos = [ckpt.info(f"model.layers.{layer}.mlp.{r}_proj.weight") for r in ("gate", "up")]
        return min(direct_io.cached_share(path, i.start, i.nbytes) for i in infos)

    if max(cached(layer) for layer in range(3)) > 0.5:
        pytest.skip("this file system keeps the file cached (tmpfs?): nothing to observe")

    def soon(layer: int) -> float:  # (all but a page or two: the kernel's own rounding)
        for _ in range(500):
            if cached(layer) >= 0.99:
                break
            time.sleep(0.01)
        return cached(layer)

    ckpt.get("model.embed_tokens.weight")
    assert soon(0) >= 0.99 and cached(1) < 0.5
    ckpt.get("model.layers.0.mlp.gate_proj.weight")
    assert soon(1) >= 0.99 and cached(2) < 0.5
    ckpt.get("model.layers.1.mlp.up_proj.weight")
    assert soon(2) >= 0.99


def test_cached_share_tells_a_cold_file_from_a_read_one(tmp_path: Path) -> None:
    """``direct_io.cached_share``: what the upcycle bench reports per run (cold or cached input)."""
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(64 * 4096))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if direct_io.cached_share(path) > 0.5:
            pytest.skip("this file system keeps the file cached (tmpfs?): nothing to observe")
        assert direct_io.cached_share(path) < 0.1
        path.read_bytes()
        assert direct_io.cached_share(path) == 1.0
        os.posix_fadvise(fd, 32 * 4096, 0, os.POSIX_FADV_DONTNEED)  # the second half dropped
    finally:
        os.close(fd)
    assert direct_io.cached_share(path, 0, 32 * 4096) == 1.0
    assert direct_io.cached_share(path, 32 * 4096, 16 * 4096) < 0.1
    assert 0.45 < direct_io.cached_share(path) < 0.55
    assert direct_io.cached_share(path, 64 * 4096) == 0.0  # an empty range
