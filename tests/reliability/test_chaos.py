"""Chaos: random signals to attempts and their grandchildren, and random SIGKILLs of the master.

(a) ``test_shard_chaos``: 100 Python SDK shards each process a known list of items
    (``helpers.reliability.WORKER``: a grandchild ``sh`` writes each item's result atomically,
    the shard checkpoints after every item). For a fixed, seeded stretch a driver sends
    SIGKILL, SIGTERM, SIGSTOP (never continued: the heartbeat timeout must replace the
    attempt), SIGSTOP then SIGCONT (a pause), to random attempt leaders and to random
    grandchildren (a stopped grandchild freezes the work, not the heartbeat: the stall
    timeout must replace the attempt). Only processes whose environment carries this
    run's ORCH_RUN_ID and this test's ORCH_HOME are ever signalled, through a pidfd.
    Meanwhile a sampler reads /proc and records any instant at which one shard had two
    attempts alive (promises 1, 3, 4, 5, 6).
(b) ``test_master_chaos``: the detached master is SIGKILLed at random points: during its
    start-up, mid-run, while checkpoints pour in, and during a shutdown (right after
    ``orch stop``); then ``orch resume -d``; repeated; finally ``orch wait``. After every
    kill the database opens and ``PRAGMA integrity_check`` says ok (promise 7), and the
    end state is the same as without faults: all done, each item's result exactly once
    (promises 5, 6).

The short variants run in CI; ``--slow`` (or ORCH_SLOW=1) runs the long ones. Figures
are printed (run with ``-s``) and recorded in docs/reliability.md.
"""

from __future__ import annotations

import heapq
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

from helpers.reliability import (
    DEADLINE_S,
    ORCH,
    PYTHON,
    WORKER,
    Env,
    ProcTable,
    Run,
    Sampler,
    check_exactly_once,
    control,
    is_master,
    orch_env,
    poll_for,
    run_pids,
    signal_verified,
    wait_run,
)

# --- (a) signals to attempts and grandchildren ------------------------------------------------

#: The weight of each fault in the driver's draw.
FAULTS = {
    "kill-leader": 30,  # SIGKILL an attempt's leader (the Python shard)
    "term-leader": 10,  # SIGTERM it
    "kill-child": 15,  # SIGKILL a grandchild (sh or sleep): the item fails, the shard exits 1
    "term-child": 10,  # SIGTERM a grandchild
    "park-leader": 8,  # SIGSTOP a leader for good: hung, replaced after the heartbeat timeout
    "park-child": 7,  # SIGSTOP a grandchild for good: stalled, replaced after the stall timeout
    "pause": 20,  # SIGSTOP anything of an attempt, SIGCONT 0.1-1.5 s later
}


def _drive(run: Run, rng: random.Random, seconds: float, max_faults: int) -> Counter[str]:
    """Send seeded random faults to the run's attempts for ``seconds``, at most ``max_faults``."""
    needles = {b"ORCH_RUN_ID": run.id.encode(), b"ORCH_HOME": str(run.env.home).encode()}
    kinds, weights = zip(*FAULTS.items(), strict=True)
    sent: Counter[str] = Counter()
    conts: list[tuple[float, int, int]] = []  # (due, pid, starttime)
    parked: set[int] = set()  # process groups with a process stopped for good: left alone
    table = ProcTable(run.id, run.env.home)
    end = time.monotonic() + seconds
    while time.monotonic() < end and sum(sent.values()) < max_faults:
        now = time.monotonic()
        while conts and conts[0][0] <= now:
            _, pid, start = heapq.heappop(conts)
            signal_verified(pid, signal.SIGCONT, needles, start)
        procs = [p for p in table.scan() if p[1] not in parked]
        leaders = [p for p in procs if p[0] == p[1]]
        children = [p for p in procs if p[0] != p[1]]
        kind = rng.choices(kinds, weights)[0]
        pool = children if kind.endswith("child") else leaders if kind.endswith("leader") else procs
        if pool:
            pid, pgid, start, _, _ = rng.choice(pool)
            signum = {"kill": signal.SIGKILL, "term": signal.SIGTERM}.get(
                kind.split("-")[0], signal.SIGSTOP)
            if signal_verified(pid, signum, needles, start):
                sent[kind] += 1
                if kind == "pause":
                    heapq.heappush(conts, (now + rng.uniform(0.1, 1.5), pid, start))
                elif kind.startswith("park"):
                    parked.add(pgid)
        time.sleep(rng.uniform(0.0, 0.05))  # allowed-sleep: seeded fault timing
    for _, pid, start in conts:
        signal_verified(pid, signal.SIGCONT, needles, start)
    return sent


def test_shard_chaos(env: Env, slow: bool) -> None:
    """Every shard ends done, every item's result is recorded exactly once, no shard ever
    had two live attempts, and nothing of the run is left."""
    seed = 20261126
    rng = random.Random(seed)
    shards_n = 100
    items, delay_s, chaos_s, max_faults = (60, 0.5, 60.0, 3000) if slow else (18, 0.5, 12.0, 300)
    sizes = {f"s{i:03d}": items for i in range(shards_n)}
    env.script("worker.py", WORKER)
    env.write("shards.csv", "id\n" + "".join(f"{k}\n" for k in sizes))
    t0 = time.monotonic()
    proc = env.start(
        "run", "--shards", "shards.csv",
        "--heartbeat-interval", "0.25", "--heartbeat-timeout", "5", "--require-heartbeat",
        "--stall-timeout", "6", "--max-restarts", "10000", "--backoff-initial", "0.05",
        "--backoff-max", "0.5", "--stop-timeout", "1",
        "--", PYTHON, str(env.cwd / "worker.py"), str(env.cwd / "out"), str(items),
        str(delay_s), "child",
    )
    run = wait_run(env)
    with Sampler(run.id, env.home) as sampler:
        faults = _drive(run, rng, chaos_s, max_faults)
        try:
            code = proc.wait(timeout=DEADLINE_S * 2)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the run did not end; {run.shards()}") from None
    elapsed = time.monotonic() - t0
    output = (env.cwd / "orch.stdout").read_text() + (env.cwd / "orch.stderr").read_text()
    assert code == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert sampler.error is None, sampler.error
    # Enough samples to mean something; a loaded machine takes fewer (each walks /proc).
    assert sampler.samples > 20, sampler.samples
    assert sampler.violations == [], sampler.violations[:3]

    shards = run.shards()
    assert {k: s["state"] for k, s in shards.items()} == dict.fromkeys(sizes, "done")
    for s in shards.values():
        assert (s["done"], s["total"], s["checkpoint"]) == (items, items, {"next": items}), s
    redone = check_exactly_once(env.cwd / "out", sizes)
    assert poll_for(lambda: not run_pids(run.id, env.home), timeout=10), run_pids(run.id, env.home)
    assert run.integrity() == "ok"

    reasons: Counter[str] = Counter()
    for (reason,) in run.query("SELECT reason FROM attempts WHERE reason IS NOT NULL"):
        reasons[reason.split(":")[0].split(" (")[0]] += 1
    attempts = sum(s["attempts"] for s in shards.values())
    # The faults that freeze an attempt were noticed and the attempt replaced.
    if faults["park-leader"] >= 3:
        assert reasons["hung"] >= 1, (faults, reasons)
    if faults["park-child"] >= 3:
        assert reasons["stalled"] >= 1, (faults, reasons)
    print(f"\nshard chaos (seed {seed}): {shards_n} shards x {items} items, {chaos_s:g}s of "
          f"faults: {sum(faults.values())} sent {dict(faults)}; {attempts} attempts, attempt ends "
          f"{dict(reasons)}; items redone {sum(r for r, _ in redone.values())}; "
          f"{sampler.samples} /proc samples, max live attempts per shard "
          f"{max(sampler.max_live.values(), default=0)}; {elapsed:.1f}s in all")


# --- (b) SIGKILL of the master at random points ------------------------------------------------


def _launch(env: Env, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [ORCH, *args], cwd=env.cwd, env=orch_env(env.home), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
    )


def _new_master(run_dir: Path, old: int | None, timeout: float) -> int | None:
    """The pid of a master started after ``old`` (from master.pid, checked in /proc)."""
    def found() -> int | None:
        try:
            pid = int((run_dir / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid != old and is_master(pid) else None

    return poll_for(found, timeout=timeout, interval=0.002)


def _checkpointed(run: Run) -> int:
    return int(run.query("SELECT coalesce(sum(checkpoint_done), 0) FROM shards")[0][0])


def _start_killed_at_startup(env: Env, args: list[str], rng: random.Random) -> Run:
    """``orch run -d ARGS``, its master SIGKILLed as soon as it exists or a moment later."""
    cli = _launch(env, "run", "-d", *args)
    runs = env.home / "runs"

    def created() -> Path | None:
        return next(iter(runs.iterdir()), None) if runs.exists() else None

    run_dir = poll_for(created, timeout=DEADLINE_S)
    assert run_dir is not None, cli.communicate()[0]
    run = Run(env, run_dir.name)
    pid = _new_master(run.dir, None, DEADLINE_S)
    assert pid is not None, cli.communicate()[0]
    time.sleep(rng.uniform(0.0, 0.25))  # allowed-sleep: seeded fault timing
    assert run.kill_master(pid)
    cli.communicate(timeout=DEADLINE_S)
    return run


def _kill_cycle(env: Env, run: Run, kind: str, rng: random.Random) -> bool:
    """Resume the run and SIGKILL its new master at a moment of the ``kind`` chosen."""
    if kind == "startup":
        # Imports, the run lock, the store, the guardian, the sockets, the first spawns.
        old = run.master_pid()
        cli = _launch(env, "resume", run.id, "-d")
        pid = _new_master(run.dir, old, DEADLINE_S)
        assert pid is not None, cli.communicate()[0]
        time.sleep(rng.uniform(0.0, 0.25))  # allowed-sleep: seeded fault timing
        hit = run.kill_master(pid)
        cli.communicate(timeout=DEADLINE_S)
        return hit
    resumed = env.orch("resume", run.id, "-d", timeout=DEADLINE_S)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed.stdout.strip().splitlines()[-1] == run.id
    if kind == "mid":
        time.sleep(rng.uniform(0.1, 1.0))  # allowed-sleep: seeded moment to kill the master mid-run
    elif kind == "checkpoint":
        # While checkpoints pour in: at least 50 more stored since the resume.
        before = _checkpointed(run)
        poll_for(lambda: _checkpointed(run) >= before + 50, timeout=10, interval=0.005)
        time.sleep(rng.uniform(0.0, 0.03))  # allowed-sleep: seeded fault timing
    else:
        time.sleep(rng.uniform(0.1, 0.6))  # allowed-sleep: seeded moment to kill the master
        # What `orch stop` sends, straight to the socket, so that the kill lands while the
        # graceful shards are still finishing their items.
        reply = control(str(run.row()["control"]), {"v": 1, "op": "stop"})
        assert reply is None or reply["ok"], reply
        time.sleep(rng.uniform(0.0, 0.05))  # allowed-sleep: seeded fault timing
    return run.kill_master()


def test_master_chaos(env: Env, slow: bool) -> None:
    """SIGKILL the master at start-up, mid-run, under checkpoint load and during shutdown;
    resume; repeat. The database is intact after every kill and the run ends as if
    nothing had happened."""
    seed = 7071
    rng = random.Random(seed)
    cycles = 24 if slow else 10
    # Fast shards checkpoint ~100 times a second each; slow ones have a grandchild per item.
    # All are graceful: SIGTERM lets them finish their item, so a shutdown takes a while.
    sizes = {**{f"fast{i}": (1600 if slow else 700) for i in range(4)},
             **{f"slow{i}": (160 if slow else 70) for i in range(4)}}
    env.script("worker.py", WORKER)
    env.write("shards.csv", "id,n,delay,how\n" + "".join(
        f"{k},{n},{'0.004' if k.startswith('fast') else '0.08'},"
        f"{'self' if k.startswith('fast') else 'child'}\n" for k, n in sizes.items()))
    args = ["--shards", "shards.csv", "--stop-timeout", "2", "--backoff-initial", "0.05",
            "--max-restarts", "1000", "--", PYTHON, str(env.cwd / "worker.py"),
            str(env.cwd / "out"), "{n}", "{delay}", "{how}", "graceful"]
    kinds = ["startup", "mid", "checkpoint", "shutdown"]
    plan = ["startup"] + [rng.choice(kinds) for _ in range(cycles - 1)]
    for k in kinds:  # every kind at least once
        if k not in plan:
            plan[rng.randrange(1, cycles)] = k
    done_attempts: dict[str, int] = {}
    killed: Counter[str] = Counter()
    t0 = time.monotonic()
    run = _start_killed_at_startup(env, args, rng)
    killed["startup"] += 1
    cycles_run = 1
    with Sampler(run.id, env.home) as sampler:
        for kind in plan[1:]:
            if run.row()["state"] == "done":
                break
            killed[kind] += _kill_cycle(env, run, kind, rng)
            cycles_run += 1
            # Promise 7: whatever instant the kill hit, the database opens and is intact.
            assert run.integrity() == "ok"
            assert run.row()["id"] == run.id
            for k, s in run.shards().items():
                if s["state"] == "done":
                    assert s["attempts"] == done_attempts.setdefault(k, s["attempts"]), k
            if rng.random() < 0.5:
                # Sometimes let the attempts notice the death first (promise 6)...
                assert poll_for(lambda: not run.pids(), timeout=15), run.pids()
            # ...sometimes resume at once: resume must stop the leftovers itself.
        final = env.orch("resume", run.id, "-d", timeout=DEADLINE_S)
        assert final.returncode == 0, final.stdout + final.stderr
        waited = env.orch("wait", run.id, "--timeout", "120", timeout=150)
        assert waited.returncode == 0, waited.stdout + waited.stderr
    assert sampler.error is None, sampler.error
    assert sampler.violations == [], sampler.violations[:3]
    assert sum(killed.values()) >= 8 and set(killed) == set(kinds), killed
    assert run.integrity() == "ok"
    shards = run.shards()
    assert {k: s["state"] for k, s in shards.items()} == dict.fromkeys(sizes, "done")
    for k, n in done_attempts.items():
        assert shards[k]["attempts"] == n, f"done shard {k} ran again"
    redone = check_exactly_once(env.cwd / "out", sizes)
    assert poll_for(lambda: not run.pids(), timeout=10), run.pids()
    attempts = {k: s["attempts"] for k, s in shards.items()}
    print(f"\nmaster chaos (seed {seed}): {cycles_run} cycles {dict(Counter(plan[:cycles_run]))}, "
          f"masters SIGKILLed {dict(killed)}; {cycles_run} integrity checks ok; attempts "
          f"{attempts}; items redone {sum(r for r, _ in redone.values())}; {sampler.samples} "
          f"/proc samples; {time.monotonic() - t0:.1f}s in all")
