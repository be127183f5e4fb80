"""The filesystem rules every writer shares: nothing half-written, nothing of the user's lost.

* ``atomic_write``: a file's new content appears whole or not at all (temp file in the same
  directory, fsync, rename, fsync of the directory); ``write_temp`` is its first half, for
  writers that publish the temp file another way (``run_lock`` links it: create-if-absent).
* ``check_io``: the one check every tool that writes makes before writing anything: each of
  its outputs against each of its inputs (``check_disjoint``: an output must not be, contain
  or lie inside an input, however either is spelled: ``..``, ``./``, trailing ``/``, relative
  or absolute, symlinks, hard links, bind mounts), ``--overwrite`` or not. An input that is a
  checkpoint also covers what reading it touches (``input_paths``: the iter dir its ``latest``
  names, the ``hf/`` record beside an iter dir).
* Run files (a run's ``config.yaml``, ``metrics.jsonl``, lock, results) are never written
  through a symbolic link: ``check_run_files`` names one found where a run file goes,
  ``open_append`` and ``write_temp`` open with ``O_NOFOLLOW`` / ``O_EXCL``, and
  ``atomic_write`` replaces a link by a file instead of writing into its target.
* ``replace_dir`` / ``staging``: a finished directory takes the place of an existing output in
  one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``), so no kill leaves the old output moved
  away. Where the filesystem cannot swap, the old output is renamed aside for the two renames
  only (signals deferred) and a later run puts it back if a SIGKILL struck in between.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import signal
import socket
import stat
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from megatron_ext.errors import UsageError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
# errno values meaning "this kernel / filesystem cannot swap": use the two-rename fallback.
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}
PathLike = str | os.PathLike


# --- files appear whole -----------------------------------------------------------------------
def fsync_dir(directory: PathLike) -> None:
    """Make the directory's entries (a rename into it) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(path: PathLike, data: str | bytes) -> Path:
    """Write ``data`` to a hidden temp file beside ``path`` and fsync it; returns the temp path
    (the caller publishes it, then removes it if it is still there). The name holds host and
    pid, so writers on different nodes of a shared filesystem never share a temp file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # a leftover of this pid (a link there is removed, not followed)
    # O_EXCL: created here, never an existing file or a link planted at the predictable name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with open(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a full disk (or a signal) leaves nothing half-written behind
        discard(tmp)
        raise
    return tmp


def discard(path: Path) -> None:
    """Remove a temporary file if it is there; never raises (a cleanup must not replace the
    error that made it necessary, e.g. a directory that turned read-only)."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def atomic_write(path: PathLike, data: str | bytes) -> None:
    """Replace ``path``'s content with ``data`` (text is UTF-8) so that a reader, or a run after
    a crash or kill -9 at any moment, sees either the old content or the new one, whole. A
    symbolic link at ``path`` is replaced by the file; what it pointed to is not touched."""
    path = Path(path)
    tmp = write_temp(path, data)
    try:
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        discard(tmp)


def open_append(path: PathLike) -> TextIO:
    """``path`` opened to append text lines (line-buffered, created if absent), never through a
    symbolic link (``OSError`` ELOOP) and never a FIFO or device, which could block or swallow
    the run's record (``OSError``)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                 | os.O_NONBLOCK, 0o644)  # (no effect on a regular file)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
    return open(fd, "a", buffering=1, encoding="utf-8")


def check_run_files(directory: PathLike, names: Iterable[str], what: str, *,
                    error: type[Exception] = UsageError) -> None:
    """Raise ``error`` (one line) when one of ``names`` in ``directory`` (where a run file:
    config, metrics, lock, results, goes) is a symbolic link, which writing must neither follow
    into a file elsewhere nor silently replace, or a FIFO, device or socket."""
    for name in names:
        path = Path(directory) / name
        try:
            mode = os.lstat(path).st_mode
        except OSError:  # absent (or its directory is): created later, or refused there
            continue
        if stat.S_ISLNK(mode):
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            raise error(f"{what} {os.fspath(directory)}: {name} is a symbolic link (to "
                        f"{target[:200]}); a run file is never written through a link: remove "
                        f"it or choose another directory")
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise error(f"{what} {os.fspath(directory)}: {name} is a FIFO, socket or device, "
                        f"not a file a run can write: remove it or choose another directory")


# --- outputs never touch inputs ---------------------------------------------------------------
def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:  # absent or unreadable: nothing to compare by identity
        return None
    return st.st_dev, st.st_ino


def _ids_up_to_root(path: Path) -> set[tuple[int, int]]:
    """(device, inode) of ``path`` and every existing ancestor: a path reached through a bind
    mount or a second hard link has the same identity as the original."""
    ids = {_file_id(p) for p in (path, *path.parents)}
    ids.discard(None)
    return ids  # type: ignore[return-value]


def _overlap(out: Path, out_ids: set, inp: Path) -> str | None:
    """Why ``out`` (resolved) may not be written given the input ``inp`` (resolved), or None."""
    if out == inp:
        return "it is the input"
    if out.is_relative_to(inp):
        return "it lies inside the input"
    if inp.is_relative_to(out):
        return "it contains the input"
    inp_id, out_id = _file_id(inp), _file_id(out)
    if inp_id is not None and inp_id == out_id:
        return "it is the input under another name (hard link or mount)"
    if inp_id is not None and inp_id in out_ids:
        return "it lies inside the input (reached through a mount)"
    if out_id is not None and out_id in _ids_up_to_root(inp):
        return "it contains the input (reached through a mount)"
    return None


def _resolved(flag: str, path: PathLike, error: type[Exception]) -> Path:
    """``path`` made absolute with every link followed; a link loop or a NUL byte is ``error``."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError, ValueError) as e:  # RuntimeError: pathlib's link loop
        raise error(f"{flag} {os.fspath(path)!r:.300}: cannot be resolved ({e})") from None


def check_disjoint(output: PathLike, inputs: Iterable[tuple[str, PathLike]], *,
                   output_flag: str = "--output",
                   error: type[Exception] = UsageError) -> None:
    """Raise ``error`` (one line) when ``output`` is, contains or lies inside one of ``inputs``
    ((flag, path) pairs, as the user spelled them). Paths are compared after ``resolve()``
    (``..``, symlinks, relative paths) and by device and inode (hard links, bind mounts), so
    no spelling of an input can be overwritten, replaced as a whole or written into."""
    out = _resolved(output_flag, output, error)
    out_ids = _ids_up_to_root(out)
    for flag, path in inputs:
        reason = _overlap(out, out_ids, _resolved(flag, path, error))
        if reason is not None:
            raise error(f"{output_flag} {os.fspath(output)} would overwrite input {flag} "
                        f"{os.fspath(path)} ({reason})")


HF_RECORD = "hf"  # beside a converted checkpoint's iter dirs: source config.json + tokenizer files


def input_paths(flag: str, path: PathLike) -> list[tuple[str, Path]]:
    """What reading the input at ``path`` touches, as (flag, path) pairs: the path itself and,
    for a checkpoint, the iter dir its ``latest`` names (it may point elsewhere) or the ``hf/``
    record beside an iter dir (tokenizer files are copied from it)."""
    path = Path(path)
    found = [(flag, path)]
    latest = ""
    try:  # a name's worth of a regular file: anything else is the reader's to report
        if (path / "latest").is_file():
            with open(path / "latest", "rb") as f:
                latest = f.read(4096).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        latest = ""
    if latest and "\0" not in latest:
        found.append((f"{flag} (its latest)", path / latest))
    elif (path.parent / HF_RECORD).is_dir():
        found.append((f"{flag} (its hf/ record)", path.parent / HF_RECORD))
    return found


def check_io(outputs: Iterable[tuple[str, PathLike | None]],
             inputs: Iterable[tuple[str, PathLike | None]], *,
             error: type[Exception] = UsageError) -> None:
    """The check a tool that writes makes before it writes anything: every output ((flag,
    path) pairs) disjoint from every input (``check_disjoint``), each input expanded to what
    reading it touches (``input_paths``). Pairs whose path is None (an option not given) are
    skipped. Raises ``error``, one line naming the output, the input and the overlap."""
    expanded = [pair for flag, path in inputs if path is not None
                for pair in input_paths(flag, path)]
    for flag, output in outputs:
        if output is not None:
            check_disjoint(output, expanded, output_flag=flag, error=error)


# --- replacing an output ----------------------------------------------------------------------
@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM for a few system calls that must all run (they are delivered, to the
    previous handlers, on the way out). Python handlers can only be set in the main thread;
    elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    wanted = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in wanted}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        for s in caught:
            signal.raise_signal(s)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where the kernel or filesystem cannot."""
    fn = getattr(_LIBC, "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


def remove_path(path: Path) -> None:
    """Remove a file, a symlink (never what it points to) or a directory tree, if present."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def _aside(target: Path) -> Path:
    return target.parent / f".{target.name}.old-{os.getpid()}"


def recover_interrupted(target: PathLike) -> Path | None:
    """Put back an output that a killed ``replace_dir`` fallback left renamed aside (the
    target is missing and a ``.NAME.old-PID`` sibling exists). Returns the path it restored."""
    target = Path(target).absolute()
    if target.exists() or target.is_symlink() or not target.parent.is_dir():
        return None
    prefix = f".{target.name}.old-"  # not a glob: the name may hold [ or *
    aside = sorted((p for p in target.parent.iterdir() if p.name.startswith(prefix)),
                   key=os.path.getmtime)
    if not aside:
        return None
    os.rename(aside[-1], target)
    print(f"note: restored {target} from an interrupted replacement ({aside[-1].name})",
          file=sys.stderr)
    return aside[-1]


def replace_dir(new: PathLike, target: PathLike) -> None:
    """Move the finished ``new`` to ``target`` (same parent directory); an existing target
    (directory, file or symlink) is swapped out atomically, then removed. On an exception
    ``target`` is as it was and ``new`` is still in place (the caller removes it)."""
    new, target = Path(new), Path(target)
    old = None
    try:
        with signals_deferred():
            if not (target.exists() or target.is_symlink()):
                os.rename(new, target)
            elif _exchange(new, target):
                old = new  # the swap left the previous output under the staging name
            else:
                aside = _aside(target)
                os.rename(target, aside)
                try:
                    os.rename(new, target)
                except BaseException:
                    os.rename(aside, target)
                    raise
                old = aside
    finally:  # also when a signal held during the swap is delivered on the way out
        if old is not None:
            remove_path(old)


@contextmanager
def staging(output: PathLike) -> Iterator[Path]:
    """Yield a fresh hidden directory beside ``output``; when the block ends normally it replaces
    ``output`` in one atomic swap (``replace_dir``), on any error (Ctrl-C and SIGTERM included)
    it is removed. A SIGKILL leaves at most the hidden directory, never the old output moved."""
    output = Path(output).absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    remove_path(tmp)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, output)
    except BaseException:
        remove_path(tmp)  # the new tree, or the old output when the swap happened
        raise
