"""orchestrator.run: a Python callable, closures and lambdas included, once per shard."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


def _script(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return subprocess.run([sys.executable, str(path)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)


def test_a_closure_runs_once_per_shard_in_child_processes(tmp_path: Path) -> None:
    proc = _script(tmp_path, f"""
        import os, sys
        import orchestrator
        import shards

        out = {str(tmp_path / "out")!r}
        os.makedirs(out)
        factor = 7  # captured by the closure below

        def work(info):
            shards.progress(1, total=1)
            with open(os.path.join(out, info.shard_id), "w") as f:
                f.write(f"{{info.index * factor}} {{os.getpid()}} {{os.getppid()}}")

        code = orchestrator.run(lambda info: work(info), split=3, home={str(tmp_path / "home")!r})
        print("CODE", code, os.getpid())
    """)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    code_line = [ln for ln in proc.stdout.splitlines() if ln.startswith("CODE")][0]
    _, code, parent = code_line.split()
    assert code == "0"
    results = {p.name: p.read_text().split() for p in (tmp_path / "out").iterdir()}
    assert {k: v[0] for k, v in results.items()} == {"0": "0", "1": "7", "2": "14"}
    # Each shard ran in its own child process of the script (the master).
    assert all(v[2] == parent and v[1] != parent for v in results.values())


def test_an_exception_fails_the_shard_with_its_traceback(tmp_path: Path) -> None:
    proc = _script(tmp_path, f"""
        import orchestrator

        def boom(info):
            raise RuntimeError(f"no luck on shard {{info.index}}")

        code = orchestrator.run(boom, split=1, max_restarts=0, home={str(tmp_path / "home")!r})
        print("CODE", code)
    """)
    assert "CODE 1" in proc.stdout, proc.stdout + proc.stderr
    logs = list((tmp_path / "home" / "runs").glob("*/logs/*.err"))
    assert logs and "RuntimeError: no luck on shard 0" in logs[0].read_text()
