"""Per-shard log files: timestamped lines, size-based rotation, attempt markers.

Output is handled a chunk at a time, not a line at a time: every line that
arrives in one read gets that read's timestamp, inserted with one
``bytes.replace`` in C, so a shard writing many MB/s costs the master a few
calls per 64 KiB. Only a chunk that contains the stdout protocol prefix is
split into lines in Python.

A log that cannot be written (disk full, directory gone) never stops the
master: the error is reported once through ``on_error`` and the bytes are
counted as dropped until a write succeeds again.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime

from shards.protocol import STDOUT_PREFIX

MARK = b"## orch: "
#: Longest partial line kept waiting for its newline before it is written as is.
MAX_PENDING_BYTES = 1 << 20
TAIL_BYTES = 4096

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def log_stem(index: int, shard_id: str) -> str:
    """File name stem for a shard: index first (unique, sortable), then a readable id."""
    safe = _UNSAFE.sub("_", shard_id)[:48].strip("._")
    return f"{index:05d}-{safe}" if safe else f"{index:05d}"


def stamp(now: float | None = None) -> bytes:
    """``2026-11-26T19:20:01.123Z `` in UTC, the prefix of every log line."""
    t = datetime.fromtimestamp(time.time() if now is None else now, tz=UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.").encode() + b"%03dZ " % (t.microsecond // 1000)


class LogFile:
    """An append-only file rotated to ``path.1 .. path.N`` past ``max_bytes``."""

    def __init__(
        self, path: str, max_bytes: int, backups: int, on_error: Callable[[str], None]
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._on_error = on_error
        self._fd: int | None = None
        self._size = 0
        self.dropped_bytes = 0
        #: errno of the failure in progress (reported again when the cause changes), or None
        self._failing: int | None = None

    def _open(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._size = os.fstat(fd).st_size
        self._fd = fd
        return fd

    def write(self, data: bytes) -> None:
        if not data:
            return
        try:
            fd = self._fd if self._fd is not None else self._open()
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
                self._size += n
            if self._failing is not None:
                self._failing = None
                self._on_error(f"{self.path}: writing again ({self.dropped_bytes} bytes dropped)")
            if self.max_bytes and self._size >= self.max_bytes:
                self._rotate()
        except OSError as exc:
            self.dropped_bytes += len(data)
            if self._failing != (exc.errno or -1):  # e.g. ENOENT, then ENOSPC: say both
                self._failing = exc.errno or -1
                self._on_error(f"{self.path}: {exc.strerror or exc}; dropping output")

    def _rotate(self) -> None:
        self.close()
        if self.backups <= 0:
            os.truncate(self.path, 0)
            return
        for i in range(self.backups - 1, 0, -1):
            src = f"{self.path}.{i}"
            if os.path.exists(src):
                os.replace(src, f"{self.path}.{i + 1}")
        os.replace(self.path, f"{self.path}.1")

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            finally:
                self._fd = None


class StreamLog:
    """One stream (stdout or stderr) of one shard, across its attempts."""

    def __init__(self, file: LogFile, keep_tail: bool = False) -> None:
        self.file = file
        self._pending = b""
        self._keep_tail = keep_tail
        self.tail = b""
        self._header = b""  # a start marker waiting for the attempt's first output

    def _write(self, data: bytes) -> None:
        if self._header:
            data, self._header = self._header + data, b""
        self.file.write(data)

    def feed(self, data: bytes, ts: bytes) -> bytes:
        """Write the complete lines in ``data``; return them (unstamped) for the caller."""
        if self._keep_tail:
            self.tail = (self.tail + data)[-TAIL_BYTES:]
        buf = self._pending + data if self._pending else data
        cut = buf.rfind(b"\n")
        if cut < 0:
            if len(buf) > MAX_PENDING_BYTES:
                self._pending = b""
                self._write(ts + buf + b"\n")
                return buf + b"\n"
            self._pending = buf
            return b""
        complete, self._pending = buf[: cut + 1], buf[cut + 1 :]
        self._write(ts + complete[:-1].replace(b"\n", b"\n" + ts) + b"\n")
        return complete

    def flush(self, ts: bytes) -> bytes:
        """Write a partial last line (the process ended without a newline)."""
        if not self._pending:
            return b""
        rest, self._pending = self._pending + b"\n", b""
        self._write(ts + rest)
        return rest

    def mark(self, ts: bytes, text: str, lazy: bool = False) -> None:
        """Write a marker line; ``lazy`` holds it until the next write (the start marker:
        spawning 1,000 shards then opens no log file until one has something to say)."""
        line = ts + MARK + text.encode() + b"\n"
        if lazy:
            self._header = line
        else:
            self._write(line)


class ShardLogs:
    """The stdout and stderr logs of one shard."""

    def __init__(
        self,
        directory: str,
        index: int,
        shard_id: str,
        max_bytes: int,
        backups: int,
        on_error: Callable[[str], None],
    ) -> None:
        stem = os.path.join(directory, log_stem(index, shard_id))
        self.out = StreamLog(LogFile(stem + ".out", max_bytes, backups, on_error))
        self.err = StreamLog(LogFile(stem + ".err", max_bytes, backups, on_error), keep_tail=True)

    def begin(self, attempt: int, pid: int | None) -> None:
        ts = stamp()
        self.err.tail = b""
        text = f"attempt {attempt} started, pid {pid}"
        self.out.mark(ts, text, lazy=True)
        self.err.mark(ts, text, lazy=True)

    def end(self, attempt: int, what: str, duration_s: float) -> None:
        ts = stamp()
        self.out.flush(ts)
        self.err.flush(ts)
        text = f"attempt {attempt} ended: {what} after {duration_s:.3f}s"
        self.out.mark(ts, text)
        self.err.mark(ts, text)

    def stderr_tail(self, lines: int = 5) -> list[str]:
        text = self.err.tail.decode("utf-8", "replace")
        return [ln for ln in text.splitlines() if ln.strip()][-lines:]

    def close(self) -> None:
        self.out.file.close()
        self.err.file.close()


def protocol_lines(block: bytes) -> list[bytes]:
    """The stdout protocol lines in a block of complete lines (fast path: none)."""
    if STDOUT_PREFIX not in block:
        return []
    return [ln for ln in block.split(b"\n") if ln.startswith(STDOUT_PREFIX)]
