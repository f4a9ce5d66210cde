"""What a process has answered but not yet written into the prediction log (rareml.store): its
Backlog, queued in memory and, in the same order, in its journal. Each row is appended to the
journal with one os.write (to a file opened O_APPEND) before its request is answered, so a process
killed with SIGKILL loses nothing (the kernel has the bytes). Whoever can take a journal folder's
lock (its owner is gone: the kernel releases a flock with the process) writes its rows into the
log and deletes it.

    <log name>.journal/<pid>-<8 hex>/lock           flock'ed by its process for its life
    <log name>.journal/<pid>-<8 hex>/00000001.seg   MAGIC, then records: length, crc32, payload
    <log name>.journal/create.lock, prune.lock      (rareml.store's: one process at a time)

A record cut short (a write interrupted, a full disk) fails its crc and ends its segment; the
segment is never appended to again. A segment is deleted once all its rows are in the log; when
none waits, all are, and the next row starts a new segment: a journal holds only what is not yet
in the log (so replay reads little, and a row deleted by retention never comes back).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import re
import struct
import threading
import zlib
from collections import deque
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"rareml-journal-2\n"  # a new record format gets a new MAGIC (and a reader for the old one)
SEGMENT_BYTES = 1 << 20  # a new segment after this many bytes: a committed one is deleted whole
_HEAD = struct.Struct("<II")  # payload length, crc32 of the payload
_ROW = struct.Struct("<16sdIHII")  # request key, time, predictions, len(model version), len(extras), len(raw)
_ROW_1 = struct.Struct("<16sdIHI")  # format 1 (no raw request): still read
_FORMATS = {MAGIC: _ROW, b"rareml-journal-1\n": _ROW_1}  # magic -> its row header (all magics one length)
_FOLDER = re.compile(r"(?:\.new-)?[1-9][0-9]*-[0-9a-f]{8}")  # the only folders replay may delete
_SEGMENT = re.compile(r"[0-9]{8}\.seg")
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC


def encode(key: str, ts: float, version: str, n: int, probability: bytes, decision: bytes, x: bytes,
           extras: str | None, raw: bytes | None) -> bytes:
    """One request's row as a framed record (what `Journal.append` writes)."""
    v, e, r = version.encode(), extras.encode() if extras is not None else b"", raw or b""
    payload = b"".join((_ROW.pack(key.encode(), ts, n, len(v), len(e), len(r)), v, e, r, probability, decision, x))
    return _HEAD.pack(len(payload), zlib.crc32(payload)) + payload


def decode(data: bytes, head: struct.Struct) -> tuple:
    """The row (key, ts, version, n, probability, decision, x, extras, raw) of a record's payload,
    written with row header `head` (the segment's format)."""
    key, ts, n, nv, ne, *nr = head.unpack_from(data)
    nr = nr[0] if nr else 0
    at = head.size
    version, extras = data[at:at + nv].decode(), data[at + nv:at + nv + ne].decode() if ne else None
    raw = data[at + nv + ne:at + nv + ne + nr] if nr else None
    at += nv + ne + nr
    return (key.decode(), ts, version, n, data[at:at + 8 * n], data[at + 8 * n:at + 9 * n], data[at + 9 * n:],
            extras, raw)


class BacklogFull(Exception):
    pass


class Backlog:
    """One process's rows answered but not yet in the log: queued in memory (up to `max_bytes` of
    records) and journaled, in the same order. Thread-safe; the journal folder is made on first use.
    A row is (key, ts, version, n, probability, decision, x, extras, raw), the log's columns."""

    def __init__(self, root: Path, max_bytes: int):
        self.root, self.max_bytes = root, max_bytes
        self._lock = threading.Lock()  # held for a moment only
        self._queue: deque[tuple[int, tuple, int]] = deque()  # (journal segment, row, record size), oldest first
        self._journal: Journal | None = None
        self.requests = self.bytes = 0  # queued or being written

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, row: tuple) -> int:
        """Journal and queue one row; returns how many wait. BacklogFull, or OSError if it cannot
        be journaled."""
        record = encode(*row)
        with self._lock:
            if self.bytes + len(record) > self.max_bytes:
                raise BacklogFull(f"{self.bytes / 2**20:.1f} MiB of predictions wait")
            if self._journal is None:
                self._journal = Journal(self.root)
            self._queue.append((self._journal.append(record), row, len(record)))
            self.requests += 1
            self.bytes += len(record)
            return len(self._queue)

    def check(self) -> None:
        """Journal the queue again if its journal (or a part of it) was deleted; OSError if that
        fails (the queue is still written from memory, and this is tried again)."""
        with self._lock:
            if self._queue and self._journal is not None and not self._journal.intact(self._queue[0][0]):
                segment = self._journal.restart([encode(*row) for _, row, _ in self._queue])
                self._queue = deque((segment, row, size) for _, row, size in self._queue)

    def take(self, max_requests: int, max_bytes: int) -> list[tuple[int, tuple, int]]:
        """The oldest queued rows, at most so many (at least one), all of one segment (so each
        commit can free one)."""
        with self._lock:
            chunk, total = [], 0
            while self._queue and len(chunk) < max_requests:
                segment, _, size = self._queue[0]
                if chunk and (segment != chunk[0][0] or total + size > max_bytes):
                    break
                chunk.append(self._queue.popleft())
                total += size
            return chunk

    def give_back(self, chunk: list[tuple[int, tuple, int]]) -> None:
        """Rows taken but not written: first in line again."""
        with self._lock:
            self._queue.extendleft(reversed(chunk))

    def written(self, chunk: list[tuple[int, tuple, int]]) -> None:
        """Rows taken and now in the log: forgotten, and their segments deleted once whole."""
        with self._lock:
            self.requests -= len(chunk)
            self.bytes -= sum(size for _, _, size in chunk)
            if self._journal is not None:
                self._journal.retire(self._queue[0][0] if self._queue else None)

    def probe(self) -> None:
        """OSError unless the journal can be written now."""
        with self._lock:
            self._journal = self._journal or Journal(self.root)
            self._journal.probe()

    def close(self) -> None:
        """Close the journal's files and delete its folder if nothing waits (else it is replayed later)."""
        with self._lock:
            if self._journal is not None:
                self._journal.close(remove=not self.requests)
            self._journal = None

    def abandon(self) -> None:
        """In a forked child: close its copies of the parent's files (the parent keeps its lock),
        without the lock, which another thread of the parent may have held as it forked."""
        if self._journal is not None:
            self._journal.close(remove=False)


class Journal:
    """A process's journal folder. Not thread-safe: its Backlog calls it under its lock, so the
    journal's order is the queue's."""

    def __init__(self, root: Path):
        self.root = root
        self.folder, self._lock = _new_folder(root)
        self._fds: dict[int, int] = {}  # segment number -> fd, oldest first
        self._numbers = itertools.count(1)
        self._current = self._size = 0
        self._fresh = True  # no segment to append to (none yet, or the last write failed)
        self._lost = False  # queued rows are in no segment (journaling them again failed)

    def append(self, record: bytes) -> int:
        """Append one record with one write; returns its segment's number. OSError if it could
        not be written whole (the segment is then cut back and retired)."""
        if self._fresh or (self._size + len(record) > SEGMENT_BYTES and self._size > len(MAGIC)):
            self._open_segment()
        self._write(self._fds[self._current], record)
        return self._current

    def intact(self, oldest: int) -> bool:
        """The folder, its lock, segment `oldest` (the oldest queued row's) and those after it are
        all still there."""
        try:
            return (not self._lost and oldest in self._fds and self._owned()
                    and all(os.fstat(fd).st_nlink > 0 for fd in self._fds.values()))
        except OSError:
            return False

    def restart(self, records: list[bytes]) -> int:
        """Journal `records` again, in one new segment (a new folder if this one is gone), after
        something was deleted; returns that segment's number."""
        self._lost = True
        if not self._owned():
            os.close(self._lock)
            self.folder, self._lock = _new_folder(self.root)
        self._open_segment()
        for i in range(0, len(records), 4096):
            self._write(self._fds[self._current], b"".join(records[i:i + 4096]))
        self.retire(self._current)
        self._lost = False
        return self._current

    def retire(self, keep_from: int | None) -> None:
        """Delete the segments before `keep_from`, or all of them if None (the next append starts
        a new one): their rows are in the log. So a journal holds only what is not (and a row
        deleted by retention never comes back from one)."""
        if keep_from is None:
            keep_from, self._fresh = self._current + 1, True
        for number in [n for n in self._fds if n < keep_from]:
            os.close(self._fds.pop(number))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.folder / f"{number:08d}.seg")

    def probe(self) -> None:
        """Raise OSError unless 4 KiB can be written in the folder now."""
        path = self.folder / "probe"
        try:
            with open(path, "wb") as f:
                f.write(bytes(4096))
        finally:
            path.unlink(missing_ok=True)

    def close(self, remove: bool) -> None:
        """Close the files; with remove, delete the folder (its rows are all in the log)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if remove:
            delete(self.folder)
        os.close(self._lock)

    def _open_segment(self) -> None:
        number = next(self._numbers)
        path = self.folder / f"{number:08d}.seg"
        fd = os.open(path, _FLAGS, 0o644)
        try:
            _write_all(fd, MAGIC)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self._fds[number], self._current, self._size, self._fresh = fd, number, len(MAGIC), False

    def _write(self, fd: int, data: bytes) -> None:
        try:
            _write_all(fd, data)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self._size)  # no torn record left, if the file system allows
            self._fresh = True
            raise
        self._size += len(data)

    def _owned(self) -> bool:
        try:
            return os.stat(self.folder / "lock").st_ino == os.fstat(self._lock).st_ino
        except FileNotFoundError:
            return False


def _write_all(fd: int, data: bytes) -> None:
    if os.write(fd, data) != len(data):  # short: the disk filled up during the write
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _new_folder(root: Path) -> tuple[Path, int]:
    """A folder named <pid>-<random>, locked before it gets its final name (replay never sees it unlocked)."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"{os.getpid()}-{os.urandom(4).hex()}"
    new = root / f".new-{name}"
    new.mkdir()
    fd = os.open(new / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(new, root / name)
    except OSError:
        os.close(fd)
        delete(new)
        raise
    return root / name, fd


def try_lock(path: Path, create: bool = False, wait: bool = False) -> int | None:
    """An fd holding an exclusive flock on `path`, or None if another process holds it (unless
    `wait`) or the file is gone."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0), 0o644)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        if os.stat(path).st_ino == os.fstat(fd).st_ino:  # not deleted while we waited
            return fd
    except (BlockingIOError, FileNotFoundError):
        pass
    os.close(fd)
    return None


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing), waiting for it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def orphans(root: Path) -> Iterator[Path]:
    """The folders whose process is gone, each locked while the caller handles it."""
    for folder in _folders(root):
        fd = try_lock(folder / "lock")
        if fd is not None:
            try:
                yield folder
            finally:
                os.close(fd)


def segments(folder: Path) -> Iterator[list[tuple]]:
    """The rows of each segment of a folder, oldest first. ValueError for a segment of an
    unknown format (the folder must then be kept)."""
    for path in _segment_paths(folder):
        with contextlib.suppress(FileNotFoundError):
            yield list(_records(path.read_bytes()))


def find(root: Path, key: str) -> tuple | None:
    """The row of request `key` in any process's journal (live or gone), if there."""
    needle = key.encode()
    for folder in _folders(root):
        for path in _segment_paths(folder):
            try:
                data = path.read_bytes()
            except OSError:
                continue
            head = _FORMATS.get(data[:len(MAGIC)])
            at = data.find(needle) if head else -1
            while at >= len(MAGIC) + _HEAD.size:  # a payload starts with its key
                size, crc = _HEAD.unpack_from(data, at - _HEAD.size)
                if at + size <= len(data) and zlib.crc32(data[at:at + size]) == crc:
                    return decode(data[at:at + size], head)
                at = data.find(needle, at + 1)
    return None


def delete(folder: Path) -> None:
    """Delete a journal folder: only the files this module writes, so a stranger's files stay."""
    try:
        for name in os.listdir(folder):
            if _SEGMENT.fullmatch(name) or name in ("lock", "probe"):
                (folder / name).unlink(missing_ok=True)
        folder.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot delete the journal folder %s: %s", folder.name, exc)


def _records(data: bytes) -> Iterator[tuple]:
    head = _FORMATS.get(data[:len(MAGIC)])
    if head is None:
        if MAGIC.startswith(data):  # created, cut before its header was whole: empty
            return
        raise ValueError("a journal segment of an unknown format")
    at = len(MAGIC)
    while at + _HEAD.size <= len(data):
        size, crc = _HEAD.unpack_from(data, at)
        payload = data[at + _HEAD.size:at + _HEAD.size + size]
        if len(payload) != size or zlib.crc32(payload) != crc:
            return  # torn: the write was cut short, and nothing was appended after it
        yield decode(payload, head)
        at += _HEAD.size + size


def _folders(root: Path) -> list[Path]:
    try:
        return [root / name for name in sorted(os.listdir(root)) if _FOLDER.fullmatch(name)]
    except OSError:  # none yet, or not a folder: nothing to replay (writing it fails, and says so)
        return []


def _segment_paths(folder: Path) -> list[Path]:
    try:
        return [folder / name for name in sorted(os.listdir(folder)) if _SEGMENT.fullmatch(name)]
    except OSError:
        return []
