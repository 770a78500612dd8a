"""Log files: the cap on open log descriptors, writes across reopen, stamps per line."""

from __future__ import annotations

from pathlib import Path

from orchestrator.logs import LogFile, OpenLogs, StreamLog


def _open_fds(files: list[LogFile]) -> int:
    return sum(1 for f in files if f._fd is not None)


def test_open_log_files_are_capped_and_reopened_in_append_mode(tmp_path: Path) -> None:
    pool = OpenLogs(limit=2)
    errors: list[str] = []
    files = [LogFile(str(tmp_path / f"{i}.out"), 0, 0, errors.append, pool) for i in range(3)]
    for round_ in range(4):
        for i, f in enumerate(files):
            f.write(b"r%d f%d\n" % (round_, i))
            assert _open_fds(files) <= 2
            assert len(pool) == _open_fds(files)
    assert errors == []
    for i in range(3):
        assert (tmp_path / f"{i}.out").read_bytes() == b"".join(
            b"r%d f%d\n" % (r, i) for r in range(4)
        )
    assert pool.reopened == 9  # round-robin over 3 files with room for 2: every later write
    for f in files:
        f.close()
    assert len(pool) == 0


def test_the_most_recently_written_files_stay_open(tmp_path: Path) -> None:
    pool = OpenLogs(limit=2)
    a, b, c = (LogFile(str(tmp_path / n), 0, 0, print, pool) for n in "abc")
    a.write(b"1\n")
    b.write(b"1\n")
    a.write(b"2\n")  # a is now the most recent: c's open closes b
    c.write(b"1\n")
    assert (a._fd is not None, b._fd is not None, c._fd is not None) == (True, False, True)
    assert pool.reopened == 0


def test_a_line_cut_by_the_pipe_is_stamped_once_and_rotation_waits_for_its_end(
    tmp_path: Path,
) -> None:
    path = tmp_path / "x.out"
    log = StreamLog(LogFile(str(path), 20, 3, print, OpenLogs(8)))
    assert log.feed(b"hello wo", b"<1> ") == b""
    assert log.feed(b"rld\nnext ", b"<2> ") == b"hello world\n"
    assert log.feed(b"line that is long\n", b"<3> ") == b"next line that is long\n"
    assert log.flush(b"<4> ") == b""
    # past 20 bytes the file rotates, each time at a line end: no line is cut in two
    assert Path(f"{path}.2").read_bytes() == b"<1> hello world\n"
    assert Path(f"{path}.1").read_bytes() == b"<2> next line that is long\n"
    assert not path.exists() or path.read_bytes() == b""


def test_stamp_is_utc_iso_with_milliseconds_and_changes_with_the_millisecond() -> None:
    from orchestrator.logs import stamp

    assert stamp(0.0) == b"1970-01-01T00:00:00.000Z "
    assert stamp(1764500000.25) == b"2025-11-30T10:53:20.250Z "
    assert stamp(1764500000.2509) == b"2025-11-30T10:53:20.250Z "  # same ms: cached
    assert stamp(1764500000.999) == b"2025-11-30T10:53:20.999Z "
    assert stamp(1764500001.0) == b"2025-11-30T10:53:21.000Z "  # next second
    assert stamp(0.0) == b"1970-01-01T00:00:00.000Z "  # going back works too


def test_may_hold_prefix_finds_the_prefix_among_other_hashes() -> None:
    from orchestrator.logs import may_hold_prefix

    assert not may_hold_prefix(b"issue #42 fixed\n# a comment\n")
    assert may_hold_prefix(b"a #1\n" * 100 + b'##orch {"done": 1}\n')  # past 64 other '#'
    assert may_hold_prefix(b'x\n##orch {"done": 1}\n')
    assert not may_hold_prefix(b'x\n##orch {"done": 1}\n', 4)  # only the first 4 bytes
    assert not may_hold_prefix(b"##orc")


def test_rotation_inside_a_chunk_that_ends_mid_line(tmp_path: Path) -> None:
    """A chunk whose complete lines alone pass the rotation size, and whose last line is
    cut: the complete lines end the old file, the cut line opens the new one."""
    path = tmp_path / "x.out"
    errors: list[str] = []
    log = StreamLog(LogFile(str(path), 16, 5, errors.append, OpenLogs(8)))
    log.feed(b"aaaaaaaaaa\nbbbbbbbbbb\ncc", b"<1> ")
    log.feed(b"c\n", b"<2> ")
    assert errors == []
    assert Path(f"{path}.1").read_bytes() == b"<1> aaaaaaaaaa\n<1> bbbbbbbbbb\n"
    assert path.read_bytes() == b"<1> ccc\n"


def test_a_rotation_that_fails_is_reported_and_logging_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "x.out"
    errors: list[str] = []
    f = LogFile(str(path), 8, 2, errors.append, OpenLogs(8))
    f.write(b"0123456789\n")  # rotated: x.out -> x.out.1
    (tmp_path / "x.out.2").mkdir()
    (tmp_path / "x.out.2" / "keep").write_text("x")  # x.out.1 -> x.out.2 cannot happen
    f.write(b"0123456789\n")
    f.write(b"more\n")
    assert any("not rotated" in e for e in errors), errors
    assert path.read_bytes().endswith(b"more\n")
