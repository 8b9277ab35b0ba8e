"""Files that are never lost or left half-written: atomic writes, sealed (checksummed) files, and
the outputs of a command, checked before its work starts.

* :func:`atomic_write`: the bytes go to an *anonymous* file in the destination directory (Linux's
  ``O_TMPFILE``: it has no name, so a process killed by any signal, SIGKILL included, leaves
  nothing behind), which is fsynced, linked under a temporary name and renamed over the
  destination in one step (``os.replace``): readers see the old file or the new one, never a part.
  Where ``O_TMPFILE`` is not available, a named temporary file is used and removed on any
  exception; one left by a killed process (its name holds the host and the PID) is removed by the
  next write to the same destination once that process is gone.
* :func:`seal` / :func:`unseal`: a one-line header with the SHA-256 and the length of the payload;
  reading verifies both, so a flipped byte, a truncated copy or an edited file is refused.
* :class:`OutputPlan`: every file a command will write, checked before the work starts (not a
  directory, its folder creatable and writable, no two outputs on one path, an input never
  overwritten, an existing file replaced only on ``--overwrite`` or when it holds an earlier
  result of the same run) and locked while the command runs, so that a second run writing the same
  output on this machine is refused at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import secrets
import socket
import tempfile
from collections.abc import Callable, Iterable
from typing import IO, Any

from .errors import UsageError

#: first bytes of a sealed file; the header line is ``MAGIC KIND sha256=HEX bytes=N\n``
SEAL_MAGIC = b"MTLSAM-SEALED/1 "
_SEAL_HEADER = re.compile(
    rb"MTLSAM-SEALED/1 ([a-z_.]+) sha256=([0-9a-f]{64}) bytes=([0-9]{1,20})\n"
)
_MAX_HEADER = 160


class CorruptFileError(UsageError):
    """A sealed file whose checksum, length or header does not match its contents."""


# --------------------------------------------------------------------------------------------
# atomic writes


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:32] or "host"


def _temporary_name(path: str) -> str:
    """``.NAME.HOST.PID.TOKEN.tmp`` next to ``path`` (host and PID identify a stray one)."""
    directory, base = os.path.split(path)
    return os.path.join(directory, f".{base}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: the PID exists (another user's process)
        return True
    return True


def remove_stray_temporaries(path: str) -> list[str]:
    """Remove the temporary files of writes to ``path`` that a killed process of this host left
    behind (their PID is gone); returns the names removed."""
    directory, base = os.path.split(os.path.abspath(path))
    pattern = re.compile(
        rf"\.{re.escape(base)}\.{re.escape(_host())}\.([0-9]+)\.[0-9a-f]+\.tmp", re.ASCII
    )
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = pattern.fullmatch(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))
                removed.append(name)
    return removed


def _open_anonymous(directory: str) -> int | None:
    """A file descriptor of a new nameless file in ``directory``, or None where the OS or the file
    system has no ``O_TMPFILE`` (or ``/proc``, needed to give it a name)."""
    flag = getattr(os, "O_TMPFILE", 0)
    if not flag or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(directory, flag | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError:
        return None


def _link_anonymous(fd: int, name: str) -> bool:
    """Give the nameless file ``fd`` the name ``name``: ``linkat(fd, "", AT_EMPTY_PATH)`` (Linux;
    needs CAP_DAC_READ_SEARCH before Linux 6.10), else through ``/proc/self/fd``; False when
    neither works here (the caller then writes a named temporary file instead)."""
    with contextlib.suppress(OSError, AttributeError, TypeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        linkat = libc.linkat
        linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
        linkat.argtypes += [ctypes.c_int]
        at_fdcwd, at_empty_path = -100, 0x1000
        if linkat(fd, b"", at_fdcwd, os.fsencode(name), at_empty_path) == 0:
            return True
    try:
        os.link(f"/proc/self/fd/{fd}", name)
    except OSError:
        return False
    return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _fsync_directory(directory: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring); an :class:`UsageError` when
    the destination cannot be written."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    if os.path.isdir(path):
        raise UsageError(f"cannot write {path!r}: it is a directory")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the folder of {path!r}: {e.strerror or e}") from None
    remove_stray_temporaries(path)
    fd = _open_anonymous(directory)
    tmp: str | None = None
    try:
        if fd is not None:
            _write_all(fd, data)
            tmp = _temporary_name(path)
            if not _link_anonymous(fd, tmp):  # the name exists only until the rename below
                os.close(fd)
                fd, tmp = None, None
        if fd is None:
            tmp = _temporary_name(path)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0))
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)
            _write_all(fd, data)
        assert tmp is not None
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise UsageError(f"cannot write {path!r}: {e.strerror or e}") from None
    finally:
        if fd is not None:
            os.close(fd)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    _fsync_directory(directory)


# --------------------------------------------------------------------------------------------
# sealed files


def seal(payload: bytes, kind: str) -> bytes:
    """``payload`` behind a header line holding ``kind``, its SHA-256 and its length."""
    digest = hashlib.sha256(payload).hexdigest()
    return SEAL_MAGIC + f"{kind} sha256={digest} bytes={len(payload)}\n".encode() + payload


def unseal(data: bytes, kind: str, name: str) -> bytes:
    """The payload of a sealed ``kind`` file, or a :class:`CorruptFileError` naming what is wrong
    (``name`` is the file, for the message)."""
    end = data.find(b"\n", 0, _MAX_HEADER)
    header = _SEAL_HEADER.fullmatch(data[: end + 1]) if end >= 0 else None
    if header is None:
        if data.startswith(SEAL_MAGIC):
            raise CorruptFileError(f"{name}: its header line is damaged (the file is corrupted)")
        raise CorruptFileError(f"{name}: not a sealed mtlsam-fast {kind} file")
    if header.group(1).decode() != kind:
        raise CorruptFileError(
            f"{name}: a sealed {header.group(1).decode()!r} file, not a {kind} file"
        )
    payload = data[end + 1 :]
    size = int(header.group(3))
    if len(payload) != size:
        raise CorruptFileError(
            f"{name}: its header says {size} bytes but it holds {len(payload)} "
            "(a truncated or interrupted copy?)"
        )
    if hashlib.sha256(payload).hexdigest() != header.group(2).decode():
        raise CorruptFileError(
            f"{name}: checksum mismatch, the file is corrupted or was modified after it was written"
        )
    return payload


# --------------------------------------------------------------------------------------------
# the outputs of one command


def _identity(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def _free_sibling(path: str) -> str:
    root, ext = os.path.splitext(path)
    n = 2
    while os.path.lexists(f"{root}-{n}{ext}"):
        n += 1
    return f"{root}-{n}{ext}"


def _lock(path: str) -> IO[str] | None:
    """An exclusive advisory lock on ``path`` (a lock file in the temporary directory, named after
    the path, so none is ever left next to the user's files), or None where ``fcntl`` is missing.
    The kernel releases it when the process ends, however it ends."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock, the existence check remains
        return None
    uid = os.getuid() if hasattr(os, "getuid") else 0
    folder = os.path.join(tempfile.gettempdir(), f"mtlsam_fast-locks-{uid}")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        f = open(  # noqa: SIM115 - held open for the whole command: the open file is the lock
            os.path.join(folder, hashlib.sha256(path.encode()).hexdigest()[:40] + ".lock"),
            "a+",
            encoding="ascii",
        )
    except OSError:  # no usable temporary directory: run without the lock
        return None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise UsageError(
            f"{path!r} is being written by another mtlsam-fast run on this machine (pid {holder}); "
            "wait for it to finish or choose another path"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


@dataclasses.dataclass
class _Output:
    path: str
    flag: str
    same_run: Callable[[str], bool] | None
    hint: str
    note: bool
    identity: tuple[int, int, int, int] | None = None


class OutputPlan:
    """The files one command writes: declared with :meth:`add`, checked and locked on ``with``,
    written with :meth:`write` (atomically).

    ``inputs`` are ``(path, flag)`` pairs the command reads (a checkpoint to resume, a baseline
    file): no output may be one of them. ``overwrite`` allows replacing existing files; without
    it, an existing file is replaced only when its ``same_run(path)`` says it holds an earlier
    result of this very run (a re-run or a resumed run), with a note through ``warn``. An output
    that another process wrote while this command ran is never replaced: this command's file goes
    to a free sibling name (``NAME-2.json``) instead, with a warning.
    """

    def __init__(
        self,
        *,
        overwrite: bool = False,
        inputs: Iterable[tuple[str | None, str]] = (),
        warn: Callable[[str], None] = lambda s: None,
    ):
        self.overwrite = overwrite
        self.warn = warn
        self._inputs = {os.path.realpath(p): flag for p, flag in inputs if p}
        self._outputs: dict[str, _Output] = {}
        self._locks: list[IO[str]] = []
        self._created: list[str] = []

    def add(
        self,
        path: str,
        flag: str,
        *,
        same_run: Callable[[str], bool] | None = None,
        hint: str = "",
        note: bool = True,
    ) -> str:
        """Declare an output; returns its absolute path. ``hint`` ends the message that refuses an
        existing file; ``note``: tell (through ``warn``) when an earlier result of the same run is
        going to be replaced."""
        if not path or path.endswith(("/", os.sep)):
            raise UsageError(f"{flag} {path!r}: give a file path, not a directory")
        absolute = os.path.abspath(os.path.expanduser(path))
        key = os.path.realpath(absolute)
        if key in self._inputs:
            raise UsageError(
                f"{flag} {path!r} is also the file given to {self._inputs[key]}: "
                "it would be overwritten; give another path"
            )
        if key in self._outputs:
            raise UsageError(
                f"{flag} and {self._outputs[key].flag} are the same file {path!r}; "
                "give different paths"
            )
        self._outputs[key] = _Output(absolute, flag, same_run, hint, note)
        return absolute

    def __enter__(self) -> OutputPlan:
        try:
            for out in self._outputs.values():
                self._check(out)
            for key in self._outputs:
                lock = _lock(key)
                if lock is not None:
                    self._locks.append(lock)
        except BaseException:
            self._release(failed=True)
            raise
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self._release(failed=exc_type is not None)

    def _release(self, failed: bool) -> None:
        for lock in self._locks:
            lock.close()
        self._locks.clear()
        if failed:  # folders made for outputs that were never written: leave no trace
            for folder in reversed(self._created):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
        self._created.clear()

    def _check(self, out: _Output) -> None:
        path, flag = out.path, out.flag
        if os.path.lexists(path):
            if os.path.isdir(path):
                raise UsageError(
                    f"{flag} {path!r} is a directory; give a file path, "
                    f"e.g. {os.path.join(path, 'result.json')!r}"
                )
            if not os.path.isfile(path):
                raise UsageError(f"{flag} {path!r} exists and is not a regular file")
            if not self.overwrite:
                if out.same_run is None or not out.same_run(path):
                    raise UsageError(
                        f"{flag} {path!r} already exists; pass --overwrite to replace it, "
                        "or choose another path" + (f" ({out.hint})" if out.hint else "")
                    )
                if out.note:
                    self.warn(
                        f"note: {flag} {path} holds an earlier result of this same run; "
                        "it will be replaced"
                    )
        self._make_folder(os.path.dirname(path), flag, path)
        self._probe(os.path.dirname(path), flag, path)
        remove_stray_temporaries(path)
        out.identity = _identity(path)

    def _make_folder(self, folder: str, flag: str, path: str) -> None:
        missing = []
        f = folder
        while not os.path.isdir(f):
            if os.path.lexists(f):
                raise UsageError(f"{flag} {path!r}: {f!r} is not a directory")
            missing.append(f)
            parent = os.path.dirname(f)
            if parent == f:
                break
            f = parent
        for f in reversed(missing):
            try:
                os.mkdir(f)
            except FileExistsError:
                continue
            except OSError as e:
                raise UsageError(
                    f"{flag} {path!r}: cannot create the folder {f!r}: {e.strerror or e}"
                ) from None
            self._created.append(f)

    @staticmethod
    def _probe(folder: str, flag: str, path: str) -> None:
        """Create (and drop) a file in ``folder``: the write at the end of the run will work."""
        fd = _open_anonymous(folder)
        try:
            if fd is None:
                fd, tmp = tempfile.mkstemp(prefix=".mtlsam_fast-probe.", dir=folder)
                os.unlink(tmp)
            os.write(fd, b"x")
        except OSError as e:
            raise UsageError(
                f"{flag} {path!r}: cannot create files in {folder!r}: {e.strerror or e}"
            ) from None
        finally:
            if fd is not None:
                os.close(fd)

    def write(self, path: str, data: bytes) -> str:
        """Write a declared output atomically; returns the path written (a free sibling of
        ``path`` if another process wrote ``path`` since the check)."""
        out = self._outputs[os.path.realpath(os.path.abspath(path))]
        target = out.path
        if _identity(target) != out.identity:
            target = _free_sibling(target)
            self.warn(
                f"warning: {out.path} was written by another process while this run was going; "
                f"this run's {out.flag} goes to {target} instead"
            )
        atomic_write(target, data)
        if target == out.path:
            out.identity = _identity(target)
        return target
