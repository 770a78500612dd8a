"""A master killed with SIGKILL, then ``orch resume``: issue 4's no-orphan and exactly-once tests.

Shards here are Python scripts using the SDK. Each processes items
``start..n-1`` of its shard, where ``start`` is its checkpoint: it logs the
processing (append: "at least once" is visible), writes the item's result
to its own file atomically (``os.replace``, so an item done again overwrites
rather than duplicates: "exactly once" for the results), and only then
checkpoints ``{"next": i + 1}``. An interrupted attempt may therefore redo
its last item, and nothing else: a processing count above ``n + attempts - 1``
would mean work was redone from an older point than the last checkpoint.

Figures (time from SIGKILL to the last attempt gone, from ``orch resume`` to
every unfinished shard running) are printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.control import (
    ProcessSampler,
    Run,
    alive,
    detached_env,
    environ,
    proc_stat,
    start_detached,
)
from helpers.world import PYTHON, Env, poll_for, run_pids


@pytest.fixture
def denv(tmp_path: Path) -> Iterator[Env]:
    yield from detached_env(tmp_path)


WORKER = """\
import os, sys, time
from pathlib import Path
import shards

out = Path(sys.argv[1]) / os.environ["ORCH_SHARD_ID"]
n, delay = int(sys.argv[2]), float(sys.argv[3])
out.mkdir(parents=True, exist_ok=True)
cp = shards.last_checkpoint()
start = cp["next"] if cp else 0
shards.progress(start, n)
with open(out / "attempts.log", "a") as f:
    f.write(f"{os.environ['ORCH_ATTEMPT']} {start}\\n")
for i in range(start, n):
    with open(out / "processed.log", "a") as f:
        f.write(f"{i}\\n")
    time.sleep(delay)  # allowed-sleep: the shard's simulated work per item
    tmp = out / f"item-{i}.{os.getpid()}.tmp"
    tmp.write_text(f"{os.environ['ORCH_SHARD_ID']}:{i}\\n")
    os.replace(tmp, out / f"item-{i}.txt")
    shards.progress(i + 1)
    shards.checkpoint({"next": i + 1})
"""


def worker_run(env: Env, sizes: dict[str, int], delay_s: float, *extra: str) -> Run:
    env.script("worker.py", WORKER)
    env.write("shards.csv", "id,n\n" + "".join(f"{k},{n}\n" for k, n in sizes.items()))
    return Run(env, start_detached(
        env, "--shards", "shards.csv", "--stop-timeout", "2s", *extra, "--",
        PYTHON, str(env.cwd / "worker.py"), str(env.cwd / "out"), "{n}", str(delay_s),
    ))


def check_exactly_once(env: Env, run: Run, sizes: dict[str, int]) -> dict[str, int]:
    """Every item's result exists once and is right; each item was processed at least
    once and at most once more per interrupted attempt. Returns the redone counts."""
    redone: dict[str, int] = {}
    for shard, n in sizes.items():
        out = env.cwd / "out" / shard
        items = sorted(int(p.name.split("-")[1].split(".")[0]) for p in out.glob("item-*.txt"))
        assert items == list(range(n)), (shard, items)
        for i in items:
            assert (out / f"item-{i}.txt").read_text() == f"{shard}:{i}\n"
        processed = [int(x) for x in (out / "processed.log").read_text().split()]
        assert set(processed) == set(range(n)), shard
        attempts = (out / "attempts.log").read_text().splitlines()
        redone[shard] = len(processed) - n
        assert 0 <= redone[shard] <= len(attempts) - 1, (shard, processed, attempts)
    return redone


def running_attempts(run: Run) -> dict[str, set[int]]:
    """shard id -> attempt numbers of its live processes."""
    out: dict[str, set[int]] = {}
    for pid in run.pids():
        e = environ(pid)
        if "ORCH_SHARD_ID" in e:
            out.setdefault(e["ORCH_SHARD_ID"], set()).add(int(e["ORCH_ATTEMPT"]))
    return out


# --- SIGKILL of the master: no orphans ------------------------------------------------------

MIXED = """\
import os, subprocess, sys, time
if int(os.environ["ORCH_SHARD_INDEX"]) % 2:
    # Knows nothing of orch: a shell with a background grandchild.
    os.execvp("sh", ["sh", "-c", "sleep 1000 & sleep 1000; wait"])
import shards
shards.progress(0, 1000)
child = subprocess.Popen(["sleep", "1000"])  # a grandchild of the master
for _ in range(1000):
    shards.advance(1)
    time.sleep(0.05)  # allowed-sleep: the shard's simulated work per item
"""


def test_sigkill_of_the_master_leaves_no_attempt_alive(denv: Env) -> None:
    denv.script("mixed.py", MIXED)
    run = Run(denv, start_detached(denv, "--split", "6", "--", PYTHON, str(denv.cwd / "mixed.py")))

    def ready() -> bool:
        per: dict[str, int] = {}
        for pid in run.pids():
            shard = environ(pid).get("ORCH_SHARD_ID", "?")
            per[shard] = per.get(shard, 0) + 1
        sdk_connected = all(s["heartbeat_at"] for k, s in run.shards().items() if int(k) % 2 == 0)
        return sdk_connected and len(per) == 6 and all(c >= 2 for c in per.values())

    assert poll_for(ready, timeout=15), running_attempts(run)
    # pid plus start time: the suite spawns enough processes for pids to wrap around.
    before = {p: (proc_stat(p) or [""] * 20)[19] for p in run.pids()}

    def same_process_alive(pid: int, started: str) -> bool:
        fields = proc_stat(pid)
        return alive(pid) and fields is not None and fields[19] == started

    master = run.kill_master(signal.SIGKILL)
    assert master is not None
    t0 = time.monotonic()
    took = run.wait_no_attempts(timeout=10)
    print(f"\nSIGKILL of the master -> last of {len(before)} attempt processes gone "
          f"(3 SDK + 3 plain shards, grandchildren included): {took:.2f}s")
    # A process in the middle of exiting has no readable environment any more (so
    # run.pids() no longer lists it) but is not a zombie yet: give it a moment.
    left = poll_for(
        lambda: not [p for p, started in before.items() if same_process_alive(p, started)],
        timeout=5,
    )
    assert left, [p for p, started in before.items() if same_process_alive(p, started)]
    assert time.monotonic() - t0 < 10
    assert denv.status(run.id)["state"] == "lost"


def _guardian_of(master: int) -> int:
    """The master's guardian: its forked child without ORCH_RUN_ID, in its own session."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        stat = proc_stat(int(name))
        if stat is None or int(stat[1]) != master or stat[0] == "Z":
            continue
        if "ORCH_RUN_ID" not in environ(int(name)) and int(stat[3]) == int(name):
            return int(name)
    raise AssertionError(f"no guardian for master {master}")


def test_sdk_shards_exit_on_their_own_when_the_master_dies(denv: Env) -> None:
    """Without the guardian too: the SDK alone notices its master is gone."""
    denv.script("sdk.py", MIXED.replace("% 2", "% 1"))  # every shard uses the SDK
    run = Run(denv, start_detached(denv, "--split", "3", "--", PYTHON, str(denv.cwd / "sdk.py")))
    assert poll_for(lambda: len(run.pids()) == 6 and
                    all(s["heartbeat_at"] for s in run.shards().values()), timeout=15)
    master = run.master_pid()
    guardian = _guardian_of(master)
    os.kill(guardian, signal.SIGKILL)
    assert poll_for(lambda: not alive(guardian), timeout=5)
    os.kill(master, signal.SIGKILL)
    took = run.wait_no_attempts(timeout=10)
    print(f"\nSIGKILL of master and guardian -> SDK shards and their children gone: {took:.2f}s")


# --- resume ------------------------------------------------------------------------------------


def test_resume_finishes_the_run_exactly_once_from_the_checkpoints(denv: Env) -> None:
    sizes = {"a": 3, "b": 3, "c": 80, "d": 80, "e": 80}
    run = worker_run(denv, sizes, 0.03)

    def mid_run() -> bool:
        s = run.shards()
        return (s["a"]["state"] == s["b"]["state"] == "done"
                and all((s[k]["checkpoint"] or {}).get("next", 0) >= 5 for k in "cde"))

    assert poll_for(mid_run, timeout=20), run.shards()
    run.kill_master(signal.SIGKILL)
    run.wait_no_attempts(timeout=10)
    assert denv.status(run.id)["state"] == "lost"
    cut = {k: s["checkpoint"]["next"] for k, s in run.shards().items() if k in "cde"}
    assert all(n < 80 for n in cut.values()), cut
    attempts = run.attempts()
    assert attempts == {"a": 1, "b": 1, "c": 1, "d": 1, "e": 1}

    # Foreground resume: the orch process is the master; finishes with exit 0.
    t0 = time.monotonic()
    proc = denv.start("resume", run.id)
    assert poll_for(lambda: running_attempts(run) == {"c": {2}, "d": {2}, "e": {2}}, timeout=15), \
        running_attempts(run)
    to_running = time.monotonic() - t0
    print(f"\norch resume -> all 3 unfinished shards running: {to_running:.2f}s")
    assert proc.wait(timeout=30) == 0, (denv.cwd / "orch.stderr").read_text()

    assert run.row()["state"] == "done" and run.row()["exit_code"] == 0
    assert run.states() == dict.fromkeys(sizes, "done")
    assert run.attempts() == {"a": 1, "b": 1, "c": 2, "d": 2, "e": 2}, "done shards stay done"
    for k in "ab":
        assert (denv.cwd / "out" / k / "attempts.log").read_text() == "1 0\n"
    for k in "cde":
        lines = (denv.cwd / "out" / k / "attempts.log").read_text().splitlines()
        assert lines[0] == "1 0"
        # The second attempt starts where the checkpoint said, not from zero.
        assert lines[1] == f"2 {cut[k]}", (k, lines, cut)
    check_exactly_once(denv, run, sizes)
    assert run.integrity() == "ok"
    # Resuming a finished run starts nothing and changes nothing.
    again = denv.orch("resume", run.id, timeout=30)
    assert again.returncode == 0, again.stderr
    assert run.attempts() == {"a": 1, "b": 1, "c": 2, "d": 2, "e": 2}


@pytest.mark.parametrize("how", ["sigterm", "orch stop"])
def test_resume_finishes_a_run_that_was_stopped(denv: Env, how: str) -> None:
    """A graceful stop (SIGTERM at a reboot, or 'orch stop') leaves unfinished shards
    'stopped'; 'orch resume' finishes them from their checkpoints; done shards stay done."""
    sizes = {"a": 2, "b": 60, "c": 60}
    run = worker_run(denv, sizes, 0.03)
    assert poll_for(lambda: run.states()["a"] == "done" and all(
        (s["checkpoint"] or {}).get("next", 0) >= 3 for k, s in run.shards().items() if k != "a"),
        timeout=20), run.shards()
    if how == "sigterm":
        run.kill_master(signal.SIGTERM)
    else:
        assert denv.orch("stop", run.id).returncode == 0
    assert denv.orch("wait", run.id, timeout=20).returncode != 0
    assert run.states() == {"a": "done", "b": "stopped", "c": "stopped"}
    cut = {k: s["checkpoint"]["next"] for k, s in run.shards().items() if k != "a"}

    proc = denv.orch("resume", run.id, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert run.row()["state"] == "done"
    assert run.states() == dict.fromkeys(sizes, "done")
    assert run.attempts() == {"a": 1, "b": 2, "c": 2}
    for k in "bc":
        lines = (denv.cwd / "out" / k / "attempts.log").read_text().splitlines()
        assert lines == ["1 0", f"2 {cut[k]}"], (k, lines, cut)
    check_exactly_once(denv, run, sizes)


def test_resume_waits_for_leftovers_that_ignore_sigterm(denv: Env) -> None:
    """Resume right after the kill, while attempts that ignore SIGTERM still live:
    the new attempts start only once the old ones are gone (grace, then SIGKILL)."""
    stubborn = 'trap "" TERM; echo attempt $ORCH_ATTEMPT; while :; do sleep 0.1; done'
    run = Run(denv, start_detached(denv, "--split", "2", "--stop-timeout", "1.5s", "--",
                                   "sh", "-c", stubborn))
    assert poll_for(lambda: running_attempts(run) == {"0": {1}, "1": {1}}, timeout=10)
    old = run.pids()
    with ProcessSampler(run.id, denv.home) as sampler:
        run.kill_master(signal.SIGKILL)
        t0 = time.monotonic()
        proc = denv.orch("resume", run.id, "-d", timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert poll_for(lambda: running_attempts(run) == {"0": {2}, "1": {2}}, timeout=10), \
            running_attempts(run)
        took = time.monotonic() - t0
    assert poll_for(lambda: all(not alive(p) for p in old), timeout=5)
    assert sampler.violations == [], sampler.violations[:3]
    assert took >= 1.0, f"new attempts after {took:.2f}s: the stubborn ones were not waited for"
    assert "leftover" in proc.stdout
    assert denv.orch("stop", run.id).returncode == 0
    assert denv.orch("wait", run.id, timeout=20).returncode == 1


def _live_masters(run: Run) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or not alive(int(name)):
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"orchestrator.daemon" in argv and str(run.dir).encode() in argv:
            out.append(int(name))
    return out


def test_two_concurrent_resumes_start_one_master(denv: Env) -> None:
    # Attempts that ignore SIGTERM make each resume spend the grace period stopping them,
    # so the two resumes are reliably concurrent.
    stubborn = 'trap "" TERM; while :; do sleep 0.1; done'
    run = Run(denv, start_detached(denv, "--split", "2", "--stop-timeout", "1s", "--",
                                   "sh", "-c", stubborn))
    assert poll_for(lambda: running_attempts(run) == {"0": {1}, "1": {1}}, timeout=10)
    run.kill_master(signal.SIGKILL)
    with ProcessSampler(run.id, denv.home) as sampler:
        resumes = [denv.start("resume", run.id, "-d") for _ in range(2)]
        codes = sorted(p.wait(timeout=30) for p in resumes)
        assert poll_for(lambda: set(running_attempts(run)) == {"0", "1"}, timeout=10)
        # Either mistake shows within moments: a second master, or a second live attempt.
        poll_for(lambda: len(_live_masters(run)) > 1 or sampler.violations, timeout=3)
    assert sampler.violations == [], sampler.violations[:2]
    assert len(_live_masters(run)) == 1, _live_masters(run)
    assert codes[0] == 0 and codes[1] != 0, codes


def test_resume_refuses_a_live_run(denv: Env) -> None:
    run = worker_run(denv, {"a": 200}, 0.05)
    assert poll_for(lambda: run.count("running") == 1, timeout=10)
    proc = denv.orch("resume", run.id)
    assert proc.returncode != 0
    assert "live" in proc.stderr and "Traceback" not in proc.stderr
    assert run.attempts() == {"a": 1}
    assert denv.orch("stop", run.id).returncode == 0


def test_kill_and_resume_at_random_moments(denv: Env) -> None:
    """At least 10 SIGKILL-and-resume cycles at seeded random moments: in the end every
    shard's work is done exactly once, the database is intact, and at no sampled instant
    did one shard have two live attempts."""
    rng = random.Random(20261126)
    sizes = {"a": 8, "b": 30, "c": 60, "d": 90}
    run = worker_run(denv, sizes, 0.04)
    done_attempts: dict[str, int] = {}
    cycles, waited, gone_s = 12, 0, []
    with ProcessSampler(run.id, denv.home) as sampler:
        for _ in range(cycles):
            # A random moment to kill at: this chooses when, it does not wait for anything.
            time.sleep(rng.uniform(0.05, 0.9))  # allowed-sleep: seeded fault timing
            for k, s in run.shards().items():
                if s["state"] == "done":
                    done_attempts.setdefault(k, s["attempts"])
                    assert s["attempts"] == done_attempts[k], f"done shard {k} ran again"
            run.kill_master(signal.SIGKILL)
            if rng.random() < 0.5:
                # Sometimes let the attempts go first; sometimes resume straight away
                # and let resume find and stop the leftovers itself.
                gone_s.append(run.wait_no_attempts(timeout=10))
                waited += 1
            proc = denv.orch("resume", run.id, "-d", timeout=60)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert proc.stdout.strip().splitlines()[-1] == run.id
        final = denv.orch("wait", run.id, "--timeout", "60", timeout=90)
    assert final.returncode == 0, final.stderr
    # Enough samples to mean something; a loaded machine takes fewer (each walks /proc).
    assert sampler.samples > 30, sampler.samples
    assert sampler.violations == [], sampler.violations[:3]

    assert run.row()["state"] == "done"
    assert run.states() == dict.fromkeys(sizes, "done")
    for k, n in done_attempts.items():
        assert run.attempts()[k] == n, f"done shard {k} ran again"
    redone = check_exactly_once(denv, run, sizes)
    assert run.integrity() == "ok"
    assert run_pids(run.id, denv.home) == []
    print(f"\n{cycles} kill/resume cycles: attempts {run.attempts()}, items redone {redone}, "
          f"{sampler.samples} /proc samples, max live attempts per shard {sampler.max_live}; "
          f"SIGKILL -> attempts gone {min(gone_s, default=0):.2f}-{max(gone_s, default=0):.2f}s "
          f"({waited} cycles waited)")


def test_resume_retry_failed_restarts_shards_that_gave_up(denv: Env) -> None:
    """Failed shards stay failed on a plain resume; --retry-failed gives them new attempts."""
    script = denv.script("flaky.sh", 'if [ "$ORCH_ATTEMPT" -le 2 ]; then exit 3; fi\nexit 0\n')
    first = denv.orch("run", "--split", "2", "--max-restarts", "1", "--backoff-initial", "0.05",
                      "--", "sh", script)
    assert first.returncode == 1, first.stdout + first.stderr
    run_id = denv.run_id()
    plain = denv.orch("resume", run_id)
    assert plain.returncode == 1
    assert {s["state"] for s in denv.status(run_id)["shards"]} == {"failed"}
    again = denv.orch("resume", run_id, "--retry-failed")
    assert again.returncode == 0, again.stdout + again.stderr
    detail = denv.status(run_id)
    assert [(s["state"], s["attempts"]) for s in detail["shards"]] == [("done", 3), ("done", 3)]


NULL_CHECKPOINT = """\
import os, sys, time
from pathlib import Path
import shards

out = Path(sys.argv[1])
if os.environ["ORCH_ATTEMPT"] == "1":
    shards.checkpoint(None)  # a checkpoint whose state is JSON null is still a checkpoint
    (out / "checkpointed").write_text("1")
    time.sleep(1000)  # allowed-sleep: the attempt idles until the test kills its master
(out / "seen").write_text(repr((os.environ.get("ORCH_CHECKPOINT"), shards.last_checkpoint())))
"""


def test_a_null_checkpoint_survives_the_master_and_reaches_the_resumed_attempt(
    denv: Env,
) -> None:
    script = denv.script("nullcp.py", NULL_CHECKPOINT)
    out = denv.cwd / "out"
    out.mkdir()
    run = Run(denv, start_detached(denv, "--split", "1", "--", PYTHON, script, str(out)))
    assert poll_for(lambda: (out / "checkpointed").exists(), timeout=15)
    run.kill_master(signal.SIGKILL)
    proc = denv.orch("resume", run.id, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "seen").read_text() == repr(("null", None))
