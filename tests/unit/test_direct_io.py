"""platform.direct_io.SequentialFile: the bytes on disk are exactly the bytes written, whether
they went through O_DIRECT, fell back to ordinary writes part way, or never used O_DIRECT."""

from __future__ import annotations

import errno
import os
import resource
from pathlib import Path

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


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> int:
    """A 64 KiB block, so that a few hundred KB cross several block boundaries."""
    monkeypatch.setattr(direct_io, "BLOCK", 16 * ALIGN)
    return 16 * ALIGN


def test_in_order_writes_go_direct_and_give_the_exact_bytes(tmp_path: Path,
                                                            small_blocks: int) -> None:
    # odd sizes: pieces straddle blocks, and the file ends mid-block (padded, then truncated)
    pieces, want = _sequential([13, 3 * small_blocks + 77, 1, small_blocks, 4095, 70001])
    f = SequentialFile(tmp_path / "a.bin")
    if not f.direct:
        f.close()
        pytest.skip("this file system refuses O_DIRECT")
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


def test_a_refused_first_direct_write_falls_back(tmp_path: Path, small_blocks: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Some file systems accept O_DIRECT at open and refuse the first write (EINVAL)."""
    real_pwrite = os.pwrite
    direct_fds: set[int] = set()
    real_open = os.open

    def tracking_open(path, flags, *args):
        fd = real_open(path, flags, *args)
        if flags & getattr(os, "O_DIRECT", 0):
            direct_fds.add(fd)
        return fd

    def refusing_pwrite(fd, data, offset):
        if fd in direct_fds:
            raise OSError(22, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "open", tracking_open)
    monkeypatch.setattr(os, "pwrite", refusing_pwrite)
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
