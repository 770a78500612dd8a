"""Per-shard log files: timestamped lines, size-based rotation, attempt markers.

Output is handled a chunk at a time, not a line at a time: every line that
starts in one read gets that read's timestamp, inserted with one
``bytes.replace`` in C and written with one ``writev``, so a shard writing
many MB/s costs the master a few calls per read of up to 1 MiB. Only a
chunk that contains the stdout protocol prefix is split into lines in
Python.

A log that cannot be written (disk full, directory gone) never stops the
master: the error is reported once through ``on_error`` and the bytes are
counted as dropped until a write succeeds again.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable

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


_last_ms = -1
_last_stamp = b""
_last_s = -1
_last_prefix = b""


def stamp(now: float | None = None) -> bytes:
    """``2026-11-26T19:20:01.123Z `` in UTC, the prefix of every log line.

    Made once per millisecond (the date part once per second): the master
    asks for one per spawn and per read, thousands a second at start-up.
    """
    global _last_ms, _last_stamp, _last_s, _last_prefix
    ms = int((time.time() if now is None else now) * 1000)
    if ms == _last_ms:
        return _last_stamp
    sec, frac = divmod(ms, 1000)
    if sec != _last_s:
        _last_prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec)).encode()
        _last_s = sec
    _last_ms, _last_stamp = ms, _last_prefix + b"%03dZ " % frac
    return _last_stamp


class OpenLogs:
    """The log files this process holds open, at most ``limit`` at once.

    Past the limit the least recently written file is closed, and opened
    again (in append mode) on its next write. Each live attempt then costs
    the master its two pipes and no more: with thousands of attempts the
    open-files limit is spent on pipes, not on log files of quiet shards.
    While the chatty files are fewer than the limit, no file is reopened.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.reopened = 0
        self._files: dict[LogFile, None] = {}  # insertion order: least recently written first

    def opened(self, file: LogFile) -> None:
        self._files[file] = None
        while len(self._files) > self.limit:
            next(iter(self._files)).close()

    def written(self, file: LogFile) -> None:
        files = self._files
        if next(reversed(files)) is not file:  # already the most recent: nothing to move
            del files[file]
            files[file] = None

    def closed(self, file: LogFile) -> None:
        self._files.pop(file, None)

    def __len__(self) -> int:
        return len(self._files)


#: Open log files per process (2 per shard that writes, for the first 2,048 such shards).
OPEN_LOGS = OpenLogs(4096)


class LogFile:
    """An append-only file rotated to ``path.1 .. path.N`` past ``max_bytes``."""

    def __init__(
        self,
        path: str,
        max_bytes: int,
        backups: int,
        on_error: Callable[[str], None],
        pool: OpenLogs | None = None,
    ) -> None:
        self._pool = pool if pool is not None else OPEN_LOGS
        self._ever_opened = False
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._on_error = on_error
        self._fd: int | None = None
        self.size = 0
        self.dropped_bytes = 0
        #: errno of the failure in progress (reported again when the cause changes), or None
        self._failing: int | None = None

    def _open(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.size = os.fstat(fd).st_size
        self._fd = fd
        if self._ever_opened:
            self._pool.reopened += 1
        self._ever_opened = True
        self._pool.opened(self)
        return fd

    def write(self, data: bytes) -> None:
        """Append ``data`` (ending at a line end) and rotate if the file is now too big."""
        self.write_parts([data])

    def write_parts(self, parts: list[bytes | memoryview], rotate: bool = True) -> None:
        """Append ``parts`` with one ``writev``; ``rotate=False`` when they end mid-line."""
        total = sum(len(p) for p in parts)
        if not total:
            return
        try:
            if self._fd is None:
                fd = self._open()
            else:
                fd = self._fd
                self._pool.written(self)
            n = os.writev(fd, parts)
            self.size += n
            if n < total:  # rare (a regular file takes it all): finish byte by byte
                rest = memoryview(b"".join(parts))[n:]
                while rest:
                    k = os.write(fd, rest)
                    rest = rest[k:]
                    self.size += k
            if self._failing is not None:
                self._failing = None
                self._on_error(f"{self.path}: writing again ({self.dropped_bytes} bytes dropped)")
        except OSError as exc:
            self.dropped_bytes += total
            self._failed(exc, "dropping output")
            return
        if rotate and self.max_bytes and self.size >= self.max_bytes:
            self.rotate()

    def _failed(self, exc: OSError, what: str) -> None:
        if self._failing != (exc.errno or -1):  # e.g. ENOENT, then ENOSPC: say both
            self._failing = exc.errno or -1
            self._on_error(f"{self.path}: {exc.strerror or exc}; {what}")

    def due(self, more: int) -> bool:
        """Whether writing ``more`` bytes takes the file past its rotation size."""
        return bool(self.max_bytes) and self.size + more >= self.max_bytes

    def rotate(self) -> None:
        """Move the file to ``path.1`` (and older ones up); the next write starts a new one."""
        self.close()
        self._ever_opened = False  # the next open is of a new file, not a reopen
        self.size = 0
        try:
            if self.backups <= 0:
                os.truncate(self.path, 0)
                return
            for i in range(self.backups - 1, 0, -1):
                src = f"{self.path}.{i}"
                if os.path.exists(src):
                    os.replace(src, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        except FileNotFoundError:
            pass  # nothing written since the last rotation (or the file was removed)
        except OSError as exc:
            self._failed(exc, "not rotated")

    def close(self) -> None:
        if self._fd is not None:
            self._pool.closed(self)
            try:
                os.close(self._fd)
            finally:
                self._fd = None


class StreamLog:
    """One stream (stdout or stderr) of one shard, across its attempts.

    Bytes go to the file as they arrive, a line's timestamp written with its
    first byte: one ``bytes.replace`` inserts the read's timestamp after every
    newline of the chunk, and one ``writev`` writes the pieces, so a chunk
    costs one copy. A line cut by the pipe is continued by the next read
    without a second stamp. Rotation happens only at a line end, so no line
    straddles two files.
    """

    def __init__(self, file: LogFile, keep_tail: bool = False, echo: bool = True) -> None:
        self.file = file
        #: True: ``feed`` returns every line it completes (a verbose view shows them);
        #: False: only when they may hold a protocol line, which spares a copy per read.
        self.echo = echo
        self._partial = b""  # the last, unfinished line, for the lines ``feed`` returns
        self._at_line_start = True  # the file ends at a line end (or is empty)
        self._keep_tail = keep_tail
        self.tail = b""
        self._header = b""  # a start marker waiting for the attempt's first output

    def _write(self, data: bytes) -> None:
        """Write whole lines (markers); an unfinished line in the file is ended first."""
        parts: list[bytes | memoryview] = []
        if self._header:
            parts.append(self._header)
            self._header = b""
        if not self._at_line_start:
            parts.append(b"\n")
            self._at_line_start = True
        parts.append(data)
        self.file.write_parts(parts)

    def feed(self, data: bytes, ts: bytes) -> bytes:
        """Write ``data`` with a timestamp on each line; return the lines it completed
        (unstamped, for the protocol parser and the verbose view)."""
        if not data:
            return b""
        if self._keep_tail:
            self.tail = (self.tail + data[-TAIL_BYTES:])[-TAIL_BYTES:]
        body = data.replace(b"\n", b"\n" + ts)
        ends = data[-1] == 0x0A
        view = memoryview(body)[: len(body) - len(ts)] if ends else memoryview(body)
        parts: list[bytes | memoryview] = []
        if self._header:
            parts.append(self._header)
            self._header = b""
        if self._at_line_start:
            parts.append(ts)
        self._at_line_start = ends
        if not ends and self.file.due(len(view) + len(ts)):
            cut = body.rfind(b"\n")
            if cut >= 0:  # rotate at the chunk's last line end; the rest opens the new file
                parts.append(view[: cut + 1])
                self.file.write_parts(parts, rotate=False)
                self.file.rotate()
                parts, view = [], view[cut + 1 :]
        parts.append(view)
        self.file.write_parts(parts, rotate=ends)
        cut = data.rfind(b"\n")
        if cut < 0:
            if len(self._partial) + len(data) > MAX_PENDING_BYTES:
                # A line this long is no protocol line: hand it on in pieces.
                out, self._partial = self._partial + data + b"\n", b""
                return out if self.echo else b""
            self._partial += data
            return b""
        partial = self._partial
        self._partial = data[cut + 1 :]
        if not self.echo and not (
            may_hold_prefix(data, cut + 1)
            or (
                partial and (partial.startswith(STDOUT_PREFIX) or STDOUT_PREFIX.startswith(partial))
            )
        ):
            return b""
        return partial + data[: cut + 1] if partial else data[: cut + 1]

    def flush(self, ts: bytes) -> bytes:
        """End a last line that has no newline (the process ended without one)."""
        if self._at_line_start:
            return b""
        self.file.write_parts([b"\n"])
        self._at_line_start = True
        rest, self._partial = self._partial + b"\n", b""
        return rest

    def note(self, ts: bytes, text: str) -> None:
        """Write a line of orch's own (``orch: ...``) between the shard's lines (an
        unfinished line of the shard is ended first: nothing is lost)."""
        self._write(ts + text.encode("utf-8", "replace") + b"\n")

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
        echo: bool = True,
    ) -> None:
        """``echo``: ``feed`` returns every completed line (for a verbose view), else only
        those that may be protocol lines."""
        stem = os.path.join(directory, log_stem(index, shard_id))
        self.err = StreamLog(
            LogFile(stem + ".err", max_bytes, backups, on_error), keep_tail=True, echo=echo
        )
        # Kept too: PHP with display_errors on prints its fatal error on stdout.
        self.out = StreamLog(
            LogFile(stem + ".out", max_bytes, backups, on_error), keep_tail=True, echo=echo
        )

    def begin(self, attempt: int, pid: int | None) -> None:
        ts = stamp()
        self.err.tail = self.out.tail = b""
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
        """The last lines the attempt wrote on stderr; when it wrote none there, its last
        lines of stdout (protocol lines left out), so a failure always shows its words."""
        for stream in (self.err, self.out):
            text = stream.tail.decode("utf-8", "replace")
            found = [
                ln
                for ln in text.splitlines()
                if ln.strip() and not ln.startswith(STDOUT_PREFIX.decode())
            ]
            if found:
                return found[-lines:]
        return []

    def close(self) -> None:
        self.out.file.close()
        self.err.file.close()


def may_hold_prefix(data: bytes, end: int | None = None) -> bool:
    """Whether ``data[:end]`` contains the stdout protocol prefix.

    A search for ``#`` is ``memchr``, tens of times faster than a search for
    the seven-byte prefix (which ends in a space, the most common byte of a
    log line); only the ``#`` found are looked at.
    """
    find, startswith = data.find, data.startswith
    end = len(data) if end is None else end
    pos = find(b"#", 0, end)
    seen = 0
    while pos >= 0:
        if startswith(STDOUT_PREFIX, pos):
            return pos + len(STDOUT_PREFIX) <= end
        seen += 1
        if seen > 64:  # a chunk full of '#': let the substring search take over
            return data.find(STDOUT_PREFIX, pos + 1, end) >= 0
        pos = find(b"#", pos + 1, end)
    return False


_ERROR_WORDS = re.compile(r"error|exception|fatal|panic|traceback|denied|refused", re.IGNORECASE)


def pick_error(lines: list[str]) -> str:
    """The one line of an attempt's last output that best says why it failed: the
    last that names an error (PHP's "PHP Fatal error: ...", Python's "ValueError:
    ..."), else the last; shortened to 200 characters."""
    chosen = next((ln for ln in reversed(lines) if _ERROR_WORDS.search(ln)), lines[-1])
    chosen = " ".join(chosen.split())
    return chosen if len(chosen) <= 200 else chosen[:197] + "..."


def protocol_lines(block: bytes) -> list[bytes]:
    """The stdout protocol lines in a block of complete lines (fast path: none)."""
    if not may_hold_prefix(block):
        return []
    return [ln for ln in block.split(b"\n") if ln.startswith(STDOUT_PREFIX)]
