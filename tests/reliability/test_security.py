"""Security: who can reach a run, what listens, and what shard values can do.

- Modes: the run directory and its logs directory are 0700; the database, every log and
  every other file in it are 0600 (regression: task.json, master.log and master.pid were
  0644 and task.json holds the task's --env values); the sockets have no group or other
  bits.
- Another user (``nobody``, through ``setpriv``) can neither connect to the sockets nor
  read the database, the logs or the task, even when the directories above them are
  opened up: each layer holds on its own.
- The short socket directory used when the run directory's path is too long
  (``$TMPDIR/orch-UID``) is refused when someone else owns it or it is a symlink
  (regression: orch chmod'ed and used it, so its owner could swap the sockets).
- Nothing listens on TCP or UDP, on any address.
- Shard values with shell metacharacters, newlines, quotes, braces, unicode and 100 KB
  arrive byte for byte in argv, in ``--env`` values and in ``--shell`` scripts; ids
  that look like paths stay inside the logs directory; NUL bytes and values past the
  kernel's 128 KiB per-string limit are refused with a clear error, never a crash.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.reliability import (
    DEADLINE_S,
    PYTHON,
    Env,
    Run,
    home_pids,
    kill_home,
    poll_for,
    wait_run,
)

NOBODY = 65534

HOLD = """\
import os, sys, time, shards
from pathlib import Path
print("to stdout", flush=True)
print("to stderr", file=sys.stderr, flush=True)
shards.progress(0, total=1)
here = Path(__file__).parent
(here / f"ready{shards.info().index}").write_text("")
deadline = time.monotonic() + 120
while not (here / "go").exists() and time.monotonic() < deadline:
    time.sleep(0.02)  # allowed-sleep: poll interval of the shard's deadline-bounded wait for 'go'
shards.progress(1)
"""


@pytest.fixture
def open_home(env: Env) -> Iterator[Env]:
    """``env`` with its home in a short, world-traversable directory under /tmp, so that
    only orch's own modes stand between another user and the run."""
    base = Path(tempfile.mkdtemp(prefix="orch-sec-", dir="/tmp"))
    os.chmod(base, 0o711)
    env.home = base / "home"
    try:
        yield env
    finally:
        kill_home(env.home)
        shutil.rmtree(base, ignore_errors=True)


def _hold(env: Env, shards: int = 2) -> tuple[subprocess.Popen[str], Run]:
    script = env.script("hold.py", HOLD)
    proc = env.start("run", "--split", str(shards), "--env", "TOKEN=s3cret", "--",
                     PYTHON, script)
    run = wait_run(env)
    for i in range(shards):
        ready = env.cwd / f"ready{i}"
        poll_for(lambda r=ready: r.exists() or proc.poll() is not None, timeout=DEADLINE_S)
        assert ready.exists(), (env.cwd / "orch.stderr").read_text()[-3000:]
        for suffix in ("out", "err"):  # log files open with the first output
            log = run.dir / "logs" / f"{i:05d}-{i}.{suffix}"
            assert poll_for(log.exists, timeout=DEADLINE_S), log
    return proc, run


def _release(env: Env, proc: subprocess.Popen[str]) -> None:
    (env.cwd / "go").touch()
    assert proc.wait(timeout=DEADLINE_S) == 0


def _sockets(run: Run) -> list[Path]:
    row = run.row()
    paths = [Path(str(row["endpoint"])[len("ipc://"):]), Path(str(row["control"])[len("ipc://"):])]
    paths += [p for p in run.dir.iterdir() if stat.S_ISSOCK(p.lstat().st_mode)]
    return sorted(set(paths))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_modes_of_the_run_directory_files_and_sockets(open_home: Env) -> None:
    env = open_home
    proc, run = _hold(env)
    try:
        assert _mode(env.home / "runs") & 0o077 == 0, oct(_mode(env.home / "runs"))
        assert _mode(run.dir) == 0o700 and _mode(run.dir / "logs") == 0o700
        socks = _sockets(run)
        assert {p.name for p in socks} >= {"hb.sock", "control.sock", "events.sock"}, socks
        for sock in socks:
            assert stat.S_ISSOCK(sock.lstat().st_mode) and sock.lstat().st_uid == os.getuid()
            assert _mode(sock) & 0o077 == 0, (sock, oct(_mode(sock)))
        files = [p for p in run.dir.rglob("*") if p.is_file() and not p.is_symlink()]
        assert {"state.db", "task.json"} <= {p.name for p in files}
        assert any(p.suffix == ".out" for p in files) and any(p.suffix == ".err" for p in files)
        loose = {str(p.relative_to(run.dir)): oct(_mode(p)) for p in files if _mode(p) & 0o077}
        assert loose == {}, loose
    finally:
        _release(env, proc)


PROBE = """\
import os, socket, sys
results = {}
for path in sys.argv[1:]:
    try:
        if path.endswith(".sock"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
        elif os.path.isdir(path):
            os.listdir(path)
        else:
            open(path, "rb").read(1)
        results[path] = "OPEN"
    except PermissionError:
        results[path] = "denied"
    except OSError as exc:
        results[path] = type(exc).__name__
print(repr(results))
"""


def _as_nobody(paths: list[Path]) -> dict[str, str]:
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to act as another user")
    python = shutil.which("python3") or "/usr/bin/python3"
    done = subprocess.run(
        [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", python, "-I",
         "-c", PROBE, *map(str, paths)],
        capture_output=True, text=True, timeout=30, cwd="/",
    )
    assert done.returncode == 0, done.stderr
    return dict(eval(done.stdout))  # noqa: S307 - our own probe's repr of a dict of str


def test_another_user_reaches_nothing_even_with_the_directories_opened(open_home: Env) -> None:
    """As nobody: no socket connects, no file reads. Then with every directory up to the
    run opened (0755, as a careless chmod would), each socket and file still refuses on
    its own mode."""
    env = open_home
    proc, run = _hold(env)
    try:
        targets = [*_sockets(run), run.dir / "state.db", run.dir / "task.json",
                   run.dir / "logs" / "00000-0.out", run.dir / "logs", run.dir]
        closed = _as_nobody(targets)
        assert set(closed.values()) == {"denied"}, closed
        opened = [env.home, env.home / "runs", run.dir, run.dir / "logs"]
        before = {p: _mode(p) for p in opened}
        try:
            for p in opened:
                os.chmod(p, 0o755)
            again = _as_nobody([p for p in targets if p not in opened])
        finally:
            for p, mode in before.items():
                os.chmod(p, mode)
        assert set(again.values()) == {"denied"}, again
    finally:
        _release(env, proc)


def test_no_listener_beyond_loopback(open_home: Env) -> None:
    """The master, its guardian and the attempts hold no TCP or UDP socket at all."""
    env = open_home
    proc, run = _hold(env)
    try:
        pids = home_pids(env.home)
        assert proc.pid in pids and len(pids) >= 4, pids  # master, guardian, two attempts
        inodes: dict[str, int] = {}
        for pid in pids:
            fd_dir = Path(f"/proc/{pid}/fd")
            for fd in fd_dir.iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        assert inodes, "no sockets at all? the probe is broken"
        inet = []
        for table in ("tcp", "tcp6", "udp", "udp6", "raw", "raw6"):
            try:
                lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                if fields[9] in inodes:
                    inet.append((table, fields[1], fields[3], inodes[fields[9]]))
        assert inet == [], inet
        unix = Path("/proc/net/unix").read_text().splitlines()[1:]
        listening = [ln.split() for ln in unix if ln.split()[6] in inodes
                     and ln.split()[5] == "01" and len(ln.split()) > 7]
        assert listening, "the ipc sockets should show as listening Unix sockets"
        assert all(f[7].startswith("/") for f in listening), listening  # no abstract names
    finally:
        _release(env, proc)


def test_a_foreign_short_socket_directory_is_refused(env: Env) -> None:
    """A run directory too deep for a Unix socket path puts its sockets in $TMPDIR/orch-UID.
    If someone else owns that directory, or it is a symlink, orch refuses in one line
    instead of handing its sockets to that owner."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a directory owned by another user")
    tmp = env.cwd.parent / "tmp"
    tmp.mkdir(mode=0o777)
    env.home = env.cwd.parent / ("deep-" * 16) / "home"  # forces the short socket path
    short = tmp / f"orch-{os.getuid()}"
    short.mkdir()
    os.chmod(short, 0o777)
    os.chown(short, NOBODY, NOBODY)
    done = env.orch("run", "--split", "1", "--", "true", env={"TMPDIR": str(tmp)})
    assert done.returncode != 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a directory of your own" in lines[0], done.stderr
    assert _mode(short) == 0o777 and short.stat().st_uid == NOBODY  # left alone
    assert not any(p.is_socket() for p in short.iterdir())
    short.rmdir()

    target = tmp / "elsewhere"
    target.mkdir(mode=0o700)
    short.symlink_to(target)
    done = env.orch("run", "--split", "1", "--", "true", env={"TMPDIR": str(tmp)})
    assert done.returncode != 0 and "not a directory of your own" in done.stderr, done.stderr
    short.unlink()

    short.mkdir(mode=0o755)  # our own: tightened and used
    done = env.orch("run", "--split", "1", "--", "true", env={"TMPDIR": str(tmp)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert _mode(short) == 0o700


# --- shard values --------------------------------------------------------------------------

ECHO = """\
import json, os, sys
from pathlib import Path
out = Path(sys.argv[1])
(out / f"{os.environ['ORCH_SHARD_INDEX']}.json").write_text(json.dumps({
    "argv": sys.argv[2:], "env": os.environ.get("VAL"), "id": os.environ["ORCH_SHARD_ID"],
    "record": json.loads(os.environ["ORCH_SHARD"])}))
"""

NASTY = [
    "$(touch PWNED) `touch PWNED` ; touch PWNED | touch PWNED && touch PWNED || touch PWNED",
    "> PWNED < /dev/null 2>&1 & disown",
    "'single' \"double\" \\back\\slash \\' \\\" $HOME ~ * ? [a-z] #comment",
    "line one\nline two\r\nline three\n",
    "{id} {index} {{ }} {nope} {v}",
    "--help",
    "-rf",
    "",
    " leading and trailing spaces ",
    "tab\there",
    "h\u00e9llo w\u00f6rld \u2713 \u202etxt.exe \U0001f600",
    "\x1b[31mred\x1b[0m \x07 bell",
    "x" * 100_000,
]


def test_shard_values_arrive_byte_for_byte(env: Env) -> None:
    """Every value reaches argv (alone and inside a larger element), an --env value and
    ORCH_SHARD unchanged; ids with path and shell characters stay inside logs/."""
    env.script("echo.py", ECHO)
    out = env.cwd / "out"
    out.mkdir()
    records = [{"id": f"v{i}", "v": v} for i, v in enumerate(NASTY)]
    records += [{"id": "../../../escaped", "v": "a"}, {"id": "$(touch PWNED)", "v": "b"},
                {"id": "id with\nnewline", "v": "c"}, {"id": "/abs/path", "v": "d"}]
    env.write("vals.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    done = env.orch("run", "--shards", "vals.jsonl", "--env", "VAL={v}", "--",
                    PYTHON, str(env.cwd / "echo.py"), str(out), "{v}", "<{v}>", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    for i, rec in enumerate(records):
        got = json.loads((out / f"{i}.json").read_text())
        assert got == {"argv": [rec["v"], f"<{rec['v']}>"], "env": rec["v"], "id": rec["id"],
                       "record": rec}, (i, rec["id"])
    assert not list(env.cwd.rglob("PWNED*")), "a value was run by a shell"
    run = Run(env, only_run(env))
    logs = {p.name for p in (run.dir / "logs").iterdir()}
    assert len(logs) == 2 * len(records), logs
    assert all(os.sep not in n and not n.startswith(".") for n in logs), logs
    outside = {p.name for p in run.dir.iterdir()} - {"logs", "state.db", "state.db-wal",
                                                     "state.db-shm", "task.json", "master.lock",
                                                     "environ.json"}
    assert outside == set(), outside
    assert not (env.home / "escaped.out").exists() and not (env.cwd.parent / "escaped").exists()


def test_shard_values_in_a_shell_script_are_quoted(env: Env) -> None:
    """``--shell``: the values are data to the shell, never code."""
    records = [{"id": f"v{i}", "v": v} for i, v in enumerate(NASTY)]
    env.write("vals.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    done = env.orch("run", "--shards", "vals.jsonl", "--shell", "--",
                    "printf '%s' {v} > out-{index}.txt", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    for i, rec in enumerate(records):
        assert (env.cwd / f"out-{i}.txt").read_bytes() == rec["v"].encode(), rec["id"]
    assert not list(env.cwd.rglob("PWNED*")), "a value was run by a shell"


def only_run(env: Env) -> str:
    ids = [p.name for p in (env.home / "runs").iterdir()]
    assert len(ids) == 1, ids
    return ids[0]


def test_nul_bytes_and_oversize_values_get_clear_errors(env: Env) -> None:
    """A NUL in a value used in argv fails that shard with a plain reason; a NUL in an id
    is a one-line start error that names the file and line (regression: a traceback from
    posix_spawn, the run left 'running' with no master); a value past 128 KiB fails its
    shard with a reason that says why. Siblings finish."""
    env.write("nul.jsonl", json.dumps({"id": "ok", "v": "fine"}) + "\n"
              + json.dumps({"id": "nul", "v": "a\u0000b"}) + "\n"
              + json.dumps({"id": "big", "v": "x" * 200_000}) + "\n")
    done = env.orch("run", "--shards", "nul.jsonl", "--", "echo", "{v}")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    detail = env.status(only_run(env))
    by_id = {s["id"]: s for s in detail["shards"]}
    assert by_id["ok"]["state"] == "done"
    assert by_id["nul"]["state"] == "failed" and "NUL byte" in by_id["nul"]["reason"]
    assert by_id["big"]["state"] == "failed" and "too long" in by_id["big"]["reason"]
    assert by_id["nul"]["attempts"] == by_id["big"]["attempts"] == 1  # no retries

    for name, text in (
        ("id.jsonl", json.dumps({"id": "a\u0000b"}) + "\n"),
        ("id.csv", "id,v\nok,1\na\0b,2\n"),
        ("id.txt", "ok\na\0b\n"),
    ):
        env.write(name, text)
        runs_before = set((env.home / "runs").iterdir())
        bad = env.orch("run", "--shards", name, "--", "echo", "hi")
        assert bad.returncode == 2, (name, bad.stdout, bad.stderr)
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and "NUL" in lines[0] and name in lines[0], (name, bad.stderr)
        assert set((env.home / "runs").iterdir()) == runs_before  # nothing started
