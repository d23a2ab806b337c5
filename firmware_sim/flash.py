"""A board's flash: a host folder the firmware sees as its filesystem root, kept across resets.

Rules (docs/simulator.md, "Flash"):
- Board paths are POSIX paths rooted at ``/`` (relative ones resolve against the board's own
  working directory, never the host process's: there is no ``chdir`` of the process). ``..``
  stops at the root, so firmware cannot reach host files.
- Files opened in binary mode are unbuffered: a ``write`` reaches the flash folder when it
  returns, as a raw flash write does, so a power cut loses nothing the firmware believed
  written and keeps nothing it did not. ``tear_last_write`` simulates a write cut short.
- The ``os`` module the firmware gets is MicroPython's ``os`` (``listdir``, ``ilistdir``,
  ``stat``, ``statvfs``, ``mkdir``, ``remove``, ``rename``, ``getcwd``, ``chdir``, ``sync``,
  ``urandom``, ``uname``): no ``fsync``, no ``replace``, no ``path``, so the SDK takes the code
  paths it takes on a board. ``rename`` onto an existing file replaces it (littlefs).
- Errors are ``OSError`` with the errno and the board path, never the host path.
"""

from __future__ import annotations

import errno
import io
import os
import posixpath
import shutil
import threading
import types
import weakref
from typing import Any, Dict, Iterator, List, Optional, Tuple

#: The flash size ``statvfs`` reports (bytes): a common 2 MB filesystem partition.
DEFAULT_CAPACITY_BYTES = 2 * 1024 * 1024
_BLOCK_SIZE = 4096


class Flash:
    """The flash folder of one board and the file API its firmware uses."""

    def __init__(self, root: str, capacity_bytes: int = DEFAULT_CAPACITY_BYTES) -> None:
        os.makedirs(root, exist_ok=True)
        self.root = os.path.realpath(root)
        self.capacity_bytes = capacity_bytes
        self.cwd = "/"
        self.last_write: Optional[Tuple[str, int, int]] = None  # (board path, end offset, size)
        self._lock = threading.Lock()
        self._open_files: "weakref.WeakSet[Any]" = weakref.WeakSet()

    # -- paths -----------------------------------------------------------------------------

    def board_path(self, path: Any) -> str:
        """The absolute, normalised board path of ``path`` (relative to the board's cwd)."""
        path = os.fsdecode(path)
        if not posixpath.isabs(path):
            path = posixpath.join(self.cwd, path)
        return posixpath.normpath("/" + path.lstrip("/")).replace("//", "/")

    def host_path(self, path: Any) -> str:
        """The host file behind the board path ``path``."""
        board = self.board_path(path)
        return os.path.join(self.root, board.lstrip("/")) if board != "/" else self.root

    def _error(self, exc: OSError, path: Any) -> OSError:
        """``exc`` re-made to name the board path (host paths stay off the board)."""
        return OSError(exc.errno, exc.strerror or os.strerror(exc.errno or 0),
                       self.board_path(path))

    # -- files -----------------------------------------------------------------------------

    def open(self, file: Any, mode: str = "r", buffering: int = -1, encoding: Optional[str] = None,
             errors: Optional[str] = None, newline: Optional[str] = None, closefd: bool = True,
             opener: Any = None) -> Any:
        """The firmware's ``open``: binary files unbuffered, text files UTF-8."""
        if isinstance(file, int):
            raise OSError(errno.EBADF, "file descriptors are not available on the board")
        host = self.host_path(file)
        board = self.board_path(file)
        try:
            if "b" in mode:
                handle: Any = _FlashFile(self, board, host, _raw_mode(mode))
                if buffering not in (-1, 0):
                    handle = (io.BufferedReader(handle) if mode.startswith("r") and "+" not in mode
                              else io.BufferedRandom(handle) if "+" in mode
                              else io.BufferedWriter(handle))
            else:
                handle = io.open(host, mode, buffering, encoding or "utf-8", errors, newline)
        except OSError as exc:
            raise self._error(exc, file) from None
        with self._lock:
            self._open_files.add(handle)
        return handle

    def note_write(self, board: str, end: int, size: int) -> None:
        """Record the latest write (for ``tear_last_write``)."""
        self.last_write = (board, end, size)

    def close_all(self) -> int:
        """Power cut: close every file the firmware left open; return how many were open."""
        with self._lock:
            handles = list(self._open_files)
            self._open_files = weakref.WeakSet()
        count = 0
        for handle in handles:
            try:
                if not handle.closed:
                    count += 1
                    handle.close()
            except (OSError, ValueError):
                pass
        return count

    def tear_last_write(self, lost_bytes: int) -> bool:
        """Cut the last ``lost_bytes`` of the most recent write off its file, as a power cut
        in the middle of that write would; True if there was a write to tear."""
        if self.last_write is None or lost_bytes <= 0:
            return False
        board, end, size = self.last_write
        host = self.host_path(board)
        try:
            current = os.path.getsize(host)
        except OSError:
            return False
        cut = min(lost_bytes, size)
        if current < end:
            return False
        with open(host, "r+b") as handle:
            if current == end:
                handle.truncate(end - cut)
            else:  # written in the middle: garble the tail of that write instead
                handle.seek(end - cut)
                handle.write(b"\xff" * cut)
        self.last_write = None
        return True

    # -- host-side helpers (tests, deploy) -------------------------------------------------

    def write_file(self, path: str, data: Any) -> None:
        """Put a file on the flash (``data`` str or bytes), creating folders: a deploy."""
        host = self.host_path(path)
        os.makedirs(os.path.dirname(host), exist_ok=True)
        payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        with open(host, "wb") as handle:
            handle.write(payload)

    def read_file(self, path: str) -> bytes:
        """Read a file from the flash."""
        with open(self.host_path(path), "rb") as handle:
            return handle.read()

    def exists(self, path: str) -> bool:
        """True if ``path`` exists on the flash."""
        return os.path.exists(self.host_path(path))

    def files(self) -> Dict[str, int]:
        """Every file on the flash: board path -> size in bytes."""
        found = {}
        for folder, _dirs, names in os.walk(self.root):
            for name in names:
                host = os.path.join(folder, name)
                found["/" + os.path.relpath(host, self.root).replace(os.sep, "/")] = (
                    os.path.getsize(host))
        return found

    def used_bytes(self) -> int:
        """Bytes the files take, rounded up to whole blocks as a flash filesystem counts."""
        return sum(-(-size // _BLOCK_SIZE) * _BLOCK_SIZE for size in self.files().values())

    def erase(self) -> None:
        """Wipe the flash (every file and folder)."""
        self.close_all()
        for name in os.listdir(self.root):
            host = os.path.join(self.root, name)
            if os.path.isdir(host) and not os.path.islink(host):
                shutil.rmtree(host)
            else:
                os.remove(host)
        self.cwd = "/"

    # -- MicroPython's os ------------------------------------------------------------------

    def os_module(self, name: str = "os", machine: str = "SmartX simulated board") -> types.ModuleType:
        """A MicroPython ``os`` module bound to this flash."""
        return _make_os_module(self, name, machine)


def _raw_mode(mode: str) -> str:
    """``open`` mode to ``FileIO`` mode ('rb+' -> 'r+')."""
    raw = mode.replace("b", "").replace("t", "")
    return raw or "r"


class _FlashFile(io.FileIO):
    """An unbuffered flash file that records its last write (for power-cut tearing)."""

    def __init__(self, flash: Flash, board: str, host: str, mode: str) -> None:
        super().__init__(host, mode)
        self._flash = flash
        self._board = board
        self.board_name = board

    def write(self, data: Any) -> int:  # type: ignore[override]
        """Write straight to the flash folder and remember where (for tearing)."""
        written = super().write(data)
        if written:
            self._flash.note_write(self._board, self.tell(), written)
        return written


def _stat_tuple(result: os.stat_result) -> Tuple[int, ...]:
    return (result.st_mode, result.st_ino, result.st_dev, result.st_nlink, result.st_uid,
            result.st_gid, result.st_size, int(result.st_atime), int(result.st_mtime),
            int(result.st_ctime))


def _make_os_module(flash: Flash, name: str, machine: str) -> types.ModuleType:
    module = types.ModuleType(name, "MicroPython os on a simulated board's flash")
    module.sep = "/"

    def wrap(fn: Any) -> Any:
        def call(path: Any = ".", *args: Any) -> Any:
            try:
                return fn(path, *args)
            except OSError as exc:
                raise flash._error(exc, path) from None
        call.__name__ = fn.__name__
        call.__doc__ = fn.__doc__
        return call

    def listdir(path: Any = ".") -> List[str]:
        """Names in a folder."""
        return sorted(os.listdir(flash.host_path(path)))

    def ilistdir(path: Any = ".") -> Iterator[Tuple[str, int, int, int]]:
        """(name, type, inode, size) per entry; type 0x4000 folder, 0x8000 file."""
        host = flash.host_path(path)
        entries = []
        for entry in sorted(os.listdir(host)):
            st = os.stat(os.path.join(host, entry))
            kind = 0x4000 if os.path.isdir(os.path.join(host, entry)) else 0x8000
            entries.append((entry, kind, 0, st.st_size if kind == 0x8000 else 0))
        return iter(entries)

    def stat(path: Any) -> Tuple[int, ...]:
        """The 10-tuple MicroPython returns (size at index 6)."""
        return _stat_tuple(os.stat(flash.host_path(path)))

    def mkdir(path: Any) -> None:
        """Make a folder."""
        os.mkdir(flash.host_path(path))

    def rmdir(path: Any) -> None:
        """Remove an empty folder."""
        if flash.board_path(path) == "/":
            raise OSError(errno.EPERM, "cannot remove the root", "/")
        os.rmdir(flash.host_path(path))

    def remove(path: Any) -> None:
        """Remove a file."""
        host = flash.host_path(path)
        if os.path.isdir(host):
            raise OSError(errno.EISDIR, "is a directory", flash.board_path(path))
        os.remove(host)

    def rename(old: Any, new: Any) -> None:
        """Rename (replacing an existing file, as littlefs does)."""
        try:
            os.replace(flash.host_path(old), flash.host_path(new))
        except OSError as exc:
            raise flash._error(exc, old) from None

    def getcwd() -> str:
        """The board's working folder."""
        return flash.cwd

    def chdir(path: Any) -> None:
        """Change the board's working folder (not the host process's)."""
        board = flash.board_path(path)
        if not os.path.isdir(flash.host_path(board)):
            raise OSError(errno.ENOENT, "no such folder", board)
        flash.cwd = board

    def statvfs(path: Any = "/") -> Tuple[int, ...]:
        """(bsize, frsize, blocks, bfree, bavail, files, ffree, favail, flag, namemax)."""
        blocks = flash.capacity_bytes // _BLOCK_SIZE
        free = max(0, blocks - flash.used_bytes() // _BLOCK_SIZE)
        return (_BLOCK_SIZE, _BLOCK_SIZE, blocks, free, free, 0, 0, 0, 0, 255)

    def sync() -> None:
        """Flush the filesystem (writes are already on the flash folder)."""

    def urandom(count: int) -> bytes:
        """Random bytes from the host's CSPRNG (a board's TRNG)."""
        return os.urandom(count)

    def uname() -> Tuple[str, ...]:
        """(sysname, nodename, release, version, machine)."""
        return _Uname(("smartx-sim", "smartx-sim", "1.23.0", "v1.23.0 (simulated)", machine))

    def dupterm(*_args: Any) -> None:
        """Accepted and ignored: the console is already the board's console."""
        return None

    for fn in (listdir, ilistdir, stat, mkdir, rmdir, remove):
        setattr(module, fn.__name__, wrap(fn))
    for fn in (rename, getcwd, statvfs, sync, urandom, uname, dupterm):
        setattr(module, fn.__name__, fn)
    module.chdir = wrap(chdir)
    module.unlink = module.remove
    return module


class _Uname(tuple):
    """``os.uname()`` result with MicroPython's field names."""

    sysname = property(lambda self: self[0])
    nodename = property(lambda self: self[1])
    release = property(lambda self: self[2])
    version = property(lambda self: self[3])
    machine = property(lambda self: self[4])
