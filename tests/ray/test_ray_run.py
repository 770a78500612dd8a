"""orch run --backend ray on a real two-node local cluster (issue 13)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from helpers.ray_cluster import WORK, Cluster, items_by_attempt
from helpers.world import Env, poll_for


def ray_run_args(cluster: Cluster, *extra: str) -> list[str]:
    return ["run", "--backend", "ray", "--ray-address", cluster.address, *extra]


def gated_command(env: Env) -> tuple[Path, str]:
    """A gate file and a shard script that runs until the test creates the gate."""
    gate = env.cwd / "gate"
    wait = env.script(
        "wait.py",
        "import os, sys, time\n"
        "while not os.path.exists(sys.argv[1]):\n"
        "    time.sleep(0.05)  # allowed-sleep: the test opens the gate\n",
    )
    return gate, wait


def test_eight_shards_run_on_both_nodes_every_item_once(cluster: Cluster, env: Env) -> None:
    work = env.script("work.py", WORK)
    items = env.cwd / "items"
    items.mkdir()
    proc = env.orch(
        *ray_run_args(cluster, "--split", "8", "--jobs", "8", "--shard-cpus", "0.5"),
        "--env", f"ITEMS_DIR={items}", "--", "python", work,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    detail = env.status(env.run_id())
    nodes = {s["node"] for s in detail["shards"]}
    assert len(nodes) == 2 and None not in nodes, nodes
    assert detail["items_done"] == detail["items_total"] == 8 * 20
    for shard in range(8):
        done, _ = items_by_attempt(items / f"{shard}.items")
        assert sorted(i for att in done.values() for i in att) == list(range(20))
    # The node is in each attempt's environment, and in the human status too.
    out = (Path(detail["shards"][0]["log_stdout"])).read_text()
    assert f"node {detail['shards'][0]['node']}" in out
    table = env.orch("status", env.run_id()).stdout
    assert "NODE" in table and detail["shards"][0]["node"][:12] in table


def test_custom_resources_pin_shards_to_a_node(cluster: Cluster, env: Env) -> None:
    env.write(
        "orch.toml",
        '[tasks.pinned]\ncommand = ["python", "-c", "pass"]\nsplit = 3\nbackend = "ray"\n'
        f'ray_address = "{cluster.address}"\nresources = {{nodeB = 0.5}}\nshard_cpus = 0\n',
    )
    proc = env.orch("run", "pinned", timeout=120)
    assert proc.returncode == 0, proc.stderr
    nodes = {s["node"] for s in env.status(env.run_id())["shards"]}
    assert nodes == {cluster.node_id("nodeB")}


def test_without_ray_backend_ray_is_exit_2_with_the_install_line(env: Env) -> None:
    fake = env.cwd / "noray"
    (fake / "ray").mkdir(parents=True)
    (fake / "ray" / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    proc = env.orch("run", "--backend", "ray", "--split", "2", "--", "true",
                    env={"PYTHONPATH": str(fake)})  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "orch: --backend ray needs Ray: pip install 'orch[ray]'"
    ]
    assert not (env.home / "runs").exists() or not list((env.home / "runs").iterdir())


def test_unreachable_address_is_one_line_and_no_run(env: Env) -> None:
    pytest.importorskip("ray")
    from helpers.ray_cluster import free_port

    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = env.orch("run", "--backend", "ray", "--ray-address", address, "--split", "2",
                    "--", "true", timeout=60)  # fmt: skip
    assert time.monotonic() - started < 30
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and address in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (env.home / "runs").exists() or not list((env.home / "runs").iterdir())


def test_master_sigkill_then_resume_reattaches_never_two_live_attempts(
    cluster: Cluster, env: Env
) -> None:
    from helpers.world import run_pids

    work = env.script("work.py", WORK)
    items = env.cwd / "items"
    items.mkdir()
    master = env.start(
        *ray_run_args(cluster, "--split", "4", "--jobs", "4", "--shard-cpus", "0.5"),
        "--heartbeat-timeout", "30s",
        "--env", f"ITEMS_DIR={items}", "--env", "ITEM_S=0.25", "--", "python", work,
    )  # fmt: skip
    poll_for(lambda: (env.home / "runs").exists() and env.run_id(), timeout=60)
    run_id = env.run_id()
    assert run_id

    def shard_processes() -> dict[str, list[int]]:
        """Live attempt leaders by shard (processes running work.py for this run)."""
        out: dict[str, list[int]] = {}
        for pid in run_pids(run_id, env.home):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    environ = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if any(a.endswith(b"work.py") for a in argv):
                shard = environ[b"ORCH_SHARD_ID"].decode()
                out.setdefault(shard, []).append(pid)
        return out

    assert poll_for(lambda: len(shard_processes()) == 4, timeout=60), shard_processes()
    master.kill()
    master.wait(10)
    resumed = env.start("resume", run_id)
    samples = 0
    while resumed.poll() is None:
        live = shard_processes()
        assert all(len(pids) == 1 for pids in live.values()), live
        samples += 1
        time.sleep(0.05)  # allowed-sleep: sampling interval for the two-attempts check
        assert samples < 2400, "resume did not finish within ~2 minutes"
    assert resumed.returncode == 0, (env.cwd / "orch.stderr").read_text()
    detail = env.status(run_id)
    assert detail["items_done"] == detail["items_total"] == 4 * 20
    for shard in range(4):
        done, _ = items_by_attempt(items / f"{shard}.items")
        assert set(i for att in done.values() for i in att) == set(range(20))
        assert list(done) == [1], done  # taken back alive: no second attempt was needed
    assert {s["attempts"] for s in detail["shards"]} == {1}


@pytest.mark.parametrize("victim", ["nodeC"])
def test_node_killed_mid_run_its_shards_finish_elsewhere_from_checkpoints(
    cluster: Cluster, env: Env, victim: str
) -> None:
    cluster.add_node(victim)
    victim_id = cluster.node_id(victim)
    work = env.script("work.py", WORK)
    items = env.cwd / "items"
    items.mkdir()
    master = env.start(
        *ray_run_args(cluster, "--split", "6", "--jobs", "6", "--shard-cpus", "0.5"),
        "--max-restarts", "0",
        "--env", f"ITEMS_DIR={items}", "--env", "ITEM_S=0.2", "--env", "ITEMS=40",
        "--", "python", work,
    )  # fmt: skip
    poll_for(lambda: (env.home / "runs").exists() and env.run_id(), timeout=60)
    run_id = env.run_id()

    def on_victim() -> list[str]:
        shards = env.status(run_id)["shards"]
        # Past a checkpoint (every 5 items) and far from the end (40 items, 8 s).
        placed = [s for s in shards if s["node"] == victim_id and 6 <= (s["done"] or 0) <= 20]
        return [s["id"] for s in placed]

    doomed = poll_for(on_victim, timeout=60, interval=0.2)
    assert doomed, "no shard was placed on the victim node"
    # One host actor per node for the run, each a Ray worker started once.
    hosts = [n for n in cluster.named_actors() if n.startswith(f"orch-{run_id}-host-")]
    assert len(hosts) == 3, hosts
    workers = cluster.workers("nodeA") | cluster.workers("nodeB")
    assert len(workers) == 2, workers
    cluster.kill_node(victim)

    def replaced() -> bool:
        shards = {s["id"]: s for s in env.status(run_id)["shards"]}
        return all(
            shards[i]["state"] in ("running", "done") and shards[i]["attempts"] >= 2
            and shards[i]["node"] not in (victim_id, None)
            for i in doomed
        )  # fmt: skip

    assert poll_for(replaced, timeout=90, interval=0.2), env.status(run_id)
    # Re-placed on the surviving nodes' existing host actors: no new worker, no new actor.
    assert cluster.workers("nodeA") | cluster.workers("nodeB") == workers
    after = [n for n in cluster.named_actors() if n.startswith(f"orch-{run_id}-host-")]
    assert sorted(after) == sorted(n for n in hosts if not victim_id.startswith(n[-16:]))
    assert master.wait(120) == 0, (env.cwd / "orch.stderr").read_text()
    detail = env.status(run_id)
    assert detail["items_done"] == detail["items_total"] == 6 * 40
    shards = {s["id"]: s for s in detail["shards"]}
    assert all(s["state"] == "done" for s in shards.values())
    for shard in doomed:
        assert shards[shard]["node"] != victim_id
        done, cps = items_by_attempt(items / f"{shard}.items")
        assert len(done) >= 2, done  # it was re-placed
        assert set(i for att in done.values() for i in att) == set(range(40))
        for attempt, got in done.items():
            acked_before = max((c for a, cps_a in cps.items() if a < attempt for c in cps_a),
                               default=0)  # fmt: skip
            assert min(got) >= acked_before, (attempt, got, cps)  # never redone before a cp
    stdout = json.dumps(detail)
    assert f"node lost: {victim_id}" in (env.cwd / "orch.stdout").read_text() + stdout


def test_two_runs_on_one_cluster_have_their_own_host_actors(cluster: Cluster, env: Env) -> None:
    from helpers.world import start_orch

    gate, wait = gated_command(env)
    args = ray_run_args(
        cluster, "--split", "4", "--shard-cpus", "0", "--", "python", wait, str(gate)
    )
    other = env.cwd / "other"
    other.mkdir()
    first = env.start(*args)
    second = start_orch(*args, cwd=other, home=env.home)
    try:

        def both_running() -> list[str]:
            root = env.home / "runs"
            runs = sorted(p.name for p in root.iterdir()) if root.exists() else []
            if len(runs) != 2:
                return []
            ok = all(
                {s["state"] for s in env.status(r)["shards"]} == {"running"}
                and all(s["node"] for s in env.status(r)["shards"])
                for r in runs
            )
            return runs if ok else []

        runs = poll_for(both_running, timeout=90, interval=0.2)
        assert runs, "the two runs did not both start"
        names = cluster.named_actors()
        for run in runs:
            mine = [n for n in names if n.startswith(f"orch-{run}-host-")]
            # 4 shards spread over both nodes: one host actor per node for this run.
            assert len(mine) == 2, (run, names)
        nodes = {s["node"] for r in runs for s in env.status(r)["shards"]}
        assert len(nodes) == 2
    finally:
        gate.touch()
    assert first.wait(60) == 0
    assert second.wait(60) == 0
    assert poll_for(
        lambda: not [n for n in cluster.named_actors() if any(r in n for r in runs)], timeout=30
    ), "host actors outlived their runs"


def test_shards_that_fit_no_node_now_wait_their_turn(cluster: Cluster, env: Env) -> None:
    # Two nodes of 2 CPUs: two shards of 2 CPUs at a time; the third waits in orch's queue,
    # says so in orch status, and is placed on a node that joins the cluster meanwhile.
    gate, wait = gated_command(env)
    proc = env.start(
        *ray_run_args(cluster, "--split", "3", "--jobs", "3", "--shard-cpus", "2"),
        "--", "python", wait, str(gate),
    )  # fmt: skip
    why = "waiting for a node with CPU 2 free (2 alive nodes, all taken by this run)"
    try:

        def one_waits() -> list[dict[str, Any]]:
            root = env.home / "runs"
            if not root.exists() or not list(root.iterdir()):
                return []
            shards = env.status(env.run_id())["shards"]
            placed = [s for s in shards if s["state"] == "running" and s["node"]]
            queued = [s for s in shards if s["state"] == "running" and not s["node"]]
            return shards if len(placed) == 2 and len(queued) == 1 else []

        shards = poll_for(one_waits, timeout=90, interval=0.2)
        assert shards, "two shards did not start with the third waiting"
        assert sorted(s["message"] or "" for s in shards) == ["", "", why]
        queued = next(s["id"] for s in shards if s["message"])
        cluster.add_node("nodeD")  # a node joins mid-run: the waiting shard goes there
        joined = cluster.node_id("nodeD")

        def on_the_new_node() -> dict[str, Any] | None:
            shard = {s["id"]: s for s in env.status(env.run_id())["shards"]}[queued]
            return shard if shard["node"] == joined else None

        placed = poll_for(on_the_new_node, timeout=60, interval=0.2)
        assert placed, env.status(env.run_id())
        assert (placed["state"], placed["message"]) == ("running", None)
        assert proc.poll() is None
    finally:
        gate.touch()
        code = proc.wait(120)
        if "nodeD" in cluster.node_ports:
            cluster.kill_node("nodeD")  # the next tests count on two nodes of their own
    assert code == 0
    detail = env.status(env.run_id())
    assert {s["state"] for s in detail["shards"]} == {"done"}
    assert {s["attempts"] for s in detail["shards"]} == {1}
    assert {s["message"] for s in detail["shards"]} == {None}
    said = [Path(s["log_stderr"]).read_text() for s in detail["shards"]]
    waited = [text for text in said if f"orch: {why}" in text]
    assert len(waited) == 1, said


def test_a_shard_no_node_can_ever_fit_is_refused_before_the_run(cluster: Cluster, env: Env) -> None:
    proc = env.orch(
        *ray_run_args(cluster, "--split", "2", "--shard-cpus", "8"), "--", "true", timeout=120
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and "no node of the Ray cluster can run a shard needing CPU 8" in lines[0]
    )
    assert not (env.home / "runs").exists() or not list((env.home / "runs").iterdir())
