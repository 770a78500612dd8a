"""orch run --backend ray on a real two-node local cluster (issue 13)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from helpers.ray_cluster import WORK, Cluster, items_by_attempt
from helpers.world import Env, poll_for


def ray_run_args(cluster: Cluster, *extra: str) -> list[str]:
    return ["run", "--backend", "ray", "--ray-address", cluster.address, *extra]


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
    cluster.kill_node(victim)
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
