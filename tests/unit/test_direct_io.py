"""platform.direct_io.SequentialFile: the bytes on disk are exactly the bytes written, whether
they went through O_DIRECT, fell back to ordinary writes part way, or never used O_DIRECT."""

from __future__ import annotations

import errno
import mmap
import os
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_ext.platform import direct_io
from megatron_ext.platform.direct_io import ALIGN, SequentialFile

SHM = Path("/dev/shm")


def _data(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def _write(path: Path, pieces: list[tuple[int, torch.Tensor]], **kw) -> SequentialFile:
    f = SequentialFile(path, **kw)
    try:
        for offset, data in pieces:
            f.write_at(offset, data)
    finally:
        f.close()
    return f


def _sequential(sizes: list[int]) -> tuple[list[tuple[int, torch.Tensor]], bytes]:
    pieces, pos = [], 0
    for i, n in enumerate(sizes):
        pieces.append((pos, _data(n, i)))
        pos += n
    return pieces, b"".join(bytes(d.numpy()) for _, d in pieces)


def _direct_file(path: Path) -> SequentialFile:
    """A new ``SequentialFile`` at ``path`` writing through O_DIRECT, or the test skipped."""
    f = SequentialFile(path)
    if not f.direct:
        f.close()
        pytest.skip("this file system refuses O_DIRECT")
    return f


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> int:
    """A 64 KiB block, so that a few hundred KB cross several block boundaries."""
    monkeypatch.setattr(direct_io, "BLOCK", 16 * ALIGN)
    return 16 * ALIGN


def test_in_order_writes_go_direct_and_give_the_exact_bytes(tmp_path: Path,
                                                            small_blocks: int) -> None:
    # odd sizes: pieces straddle blocks, and the file ends mid-block (padded, then truncated)
    pieces, want = _sequential([13, 3 * small_blocks + 77, 1, small_blocks, 4095, 70001])
    f = _direct_file(tmp_path / "a.bin")
    for offset, data in pieces:
        f.write_at(offset, data)
        assert f.direct
    f.close()
    assert (tmp_path / "a.bin").read_bytes() == want


def test_bytes_like_data_and_an_empty_file(tmp_path: Path) -> None:
    _write(tmp_path / "h.bin", [(0, b"header"), (6, _data(5))])
    assert (tmp_path / "h.bin").read_bytes() == b"header" + bytes(_data(5).numpy())
    _write(tmp_path / "empty.bin", [])
    assert (tmp_path / "empty.bin").read_bytes() == b""


@pytest.mark.parametrize("direct", [True, False])
def test_out_of_order_writes_fall_back_with_the_same_bytes(tmp_path: Path, small_blocks: int,
                                                          direct: bool) -> None:
    pieces, want = _sequential([5000, 2 * small_blocks + 3, 9000, 123])
    # the first two in order (some of it flushed direct), then backwards
    order = [pieces[0], pieces[1], pieces[3], pieces[2]]
    f = _write(tmp_path / "b.bin", order, direct=direct)
    assert not f.direct
    assert (tmp_path / "b.bin").read_bytes() == want


@pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm")
def test_a_file_system_without_o_direct_gets_ordinary_writes(small_blocks: int) -> None:
    pieces, want = _sequential([100, 5 * small_blocks + 9])
    path = SHM / f"direct_io_test_{os.getpid()}.bin"
    try:
        f = _write(path, pieces)  # tmpfs refuses O_DIRECT (EINVAL at open)
        assert not f.direct
        assert path.read_bytes() == want
    finally:
        path.unlink(missing_ok=True)


def _refuse_direct_writes(monkeypatch: pytest.MonkeyPatch, refused: Callable[[Any], bool]) -> None:
    """Writes to descriptors opened with O_DIRECT fail with EINVAL where ``refused(data)``, as
    on file systems that accept O_DIRECT at open and refuse the write."""
    real_pwrite, real_open = os.pwrite, os.open
    direct_fds: set[int] = set()

    def tracking_open(path, flags, *args):
        fd = real_open(path, flags, *args)
        if flags & getattr(os, "O_DIRECT", 0):
            direct_fds.add(fd)
        return fd

    def refusing_pwrite(fd, data, offset):
        if fd in direct_fds and refused(data):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "open", tracking_open)
    monkeypatch.setattr(os, "pwrite", refusing_pwrite)


def test_a_refused_first_direct_write_falls_back(tmp_path: Path, small_blocks: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Some file systems accept O_DIRECT at open and refuse the first write (EINVAL)."""
    _refuse_direct_writes(monkeypatch, lambda data: True)
    for sizes in ([3 * small_blocks + 5], [100]):  # refused at a full block / at the last one
        pieces, want = _sequential(sizes)
        f = _write(tmp_path / "c.bin", pieces)
        assert not f.direct
        assert (tmp_path / "c.bin").read_bytes() == want


def test_discard_closes_without_writing_and_closing_twice_is_harmless(tmp_path: Path,
                                                                      small_blocks: int) -> None:
    f = SequentialFile(tmp_path / "d.bin")
    f.write_at(0, _data(small_blocks + 10))
    direct = f.direct
    f.close(discard=True)
    f.close()
    # direct: the full block already flushed, not the 10 buffered bytes; else all was written
    size = (tmp_path / "d.bin").stat().st_size
    assert size == (small_blocks if direct else small_blocks + 10)


@pytest.mark.parametrize("direct", [True, False])
def test_a_refused_write_names_the_file(tmp_path: Path, small_blocks: int, direct: bool) -> None:
    """A full disk or a size limit (here RLIMIT_FSIZE; Python ignores SIGXFSZ) is an OSError
    that names the file, not a bare errno."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 * small_blocks, hard))
    try:
        f = SequentialFile(tmp_path / "big.bin", direct=direct)
        with pytest.raises(OSError) as raised:
            f.write_at(0, _data(4 * small_blocks))
            f.close()
        f.close(discard=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert raised.value.errno == errno.EFBIG
    assert raised.value.filename == str(tmp_path / "big.bin")


def _placed(data: torch.Tensor, residue: int) -> torch.Tensor:
    """``data``'s bytes in memory whose address is ``residue`` past a page boundary (an
    anonymous map is page-aligned)."""
    room = mmap.mmap(-1, data.numel() + ALIGN)
    out = torch.frombuffer(room, dtype=torch.uint8)[residue:residue + data.numel()]
    return out.copy_(data)


@pytest.fixture
def small_in_place(monkeypatch: pytest.MonkeyPatch, small_blocks: int) -> int:
    monkeypatch.setattr(direct_io, "IN_PLACE_MIN", 2 * ALIGN)
    return small_blocks


@pytest.mark.parametrize("header", [0, 13, ALIGN, 3 * ALIGN + 100])
def test_data_aligned_like_the_file_is_written_in_place_with_the_same_bytes(
        tmp_path: Path, small_in_place: int, header: int) -> None:
    """Pieces whose memory lies at their file offset's alignment skip the buffer (their whole
    blocks); the others, and the bytes around those blocks, go through it; the file is the
    bytes written either way."""
    sizes = [header, 5 * ALIGN + 7, 3 * small_in_place + 1, 2 * ALIGN, ALIGN - 1, 9 * ALIGN]
    pieces, want = _sequential([n for n in sizes if n])
    placed = []
    for i, (offset, data) in enumerate(pieces):
        # every other piece aligned like its offset in the file, the rest a little off
        placed.append((offset, _placed(data, (offset + (0 if i % 2 else 8)) % ALIGN)))
    f = _direct_file(tmp_path / "p.bin")
    for offset, data in placed:
        f.write_at(offset, data)
    f.close()
    assert (tmp_path / "p.bin").read_bytes() == want
    aligned = [d for i, (_, d) in enumerate(pieces) if i % 2 and d.numel() >= 3 * ALIGN]
    assert 0 < f.in_place <= sum(d.numel() for d in aligned)


def test_data_aligned_unlike_the_file_is_buffered(tmp_path: Path, small_in_place: int) -> None:
    pieces, want = _sequential([100, 6 * small_in_place])
    f = _write(tmp_path / "q.bin", [(o, _placed(d, (o + 512) % ALIGN)) for o, d in pieces])
    assert f.in_place == 0
    assert (tmp_path / "q.bin").read_bytes() == want


@pytest.mark.parametrize("refuse", ["first", "in_place"])
def test_a_refused_in_place_write_falls_back_with_the_same_bytes(
        tmp_path: Path, small_in_place: int, monkeypatch: pytest.MonkeyPatch,
        refuse: str) -> None:
    """A direct write refused (EINVAL) at the first block, or only for the caller's memory,
    sends the rest of the file through ordinary writes."""
    bounce: list[int] = []  # the buffer's writes pass unless all are refused
    _refuse_direct_writes(monkeypatch, lambda data: refuse == "first" or bounce != [
        torch.frombuffer(data, dtype=torch.uint8).data_ptr()])
    f = _direct_file(tmp_path / "r.bin")
    bounce.append(f._buf_t.data_ptr())
    pieces, want = _sequential([ALIGN + 5, 4 * small_in_place, 7000])
    for offset, data in pieces:
        f.write_at(offset, _placed(data, offset % ALIGN))
    f.close()
    assert not f.direct and f.in_place == 0
    assert (tmp_path / "r.bin").read_bytes() == want
