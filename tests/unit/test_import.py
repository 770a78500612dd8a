"""``orch import``: supervisord.conf and pm2 ecosystem files to orch.toml, fed back through
orch's own config loader and task builder."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from orchestrator.config import build_task, load_config
from orchestrator.errors import ConfigError
from orchestrator.migrate import import_file
from orchestrator.opsconfig import ops_config

SUPERVISOR = """\
; a typical supervisord.conf
[supervisord]
logfile=/var/log/supervisord.log

[program:crawler]
command=/usr/bin/php crawl.php --worker=%(process_num)d --name=%(program_name)s
process_name=%(program_name)s_%(process_num)02d
numprocs=4
directory={cwd}
autorestart=unexpected
exitcodes=0,2
startsecs=10
startretries=5
stopwaitsecs=30
stopsignal=INT
stopasgroup=true
environment=APP_ENV="prod",LIST="a,b",HOME_DIR="%(ENV_HOME)s"
stdout_logfile=/var/log/crawler.out.log
stderr_logfile=/var/log/crawler.err.log
stdout_logfile_maxbytes=50MB
stdout_logfile_backups=5
user=www-data

[program:listener]
command=python3 listen.py --port=%(process_num)d {{literal}}
numprocs=2
numprocs_start=9000
autorestart=true
priority=10

[program:once]
command=./migrate.sh
autorestart=false
autostart=false
startsecs=0

[group:all]
programs=crawler,listener

[include]
files=conf.d/*.conf
"""

PM2_APPS = """
  "apps": [
    {
      "name": "api",
      "script": "server.js",
      "args": "--port 3000 --verbose",
      "instances": 4,
      "exec_mode": "cluster",
      "autorestart": true,
      "autostart": true,
      "max_restarts": 10,
      "exp_backoff_restart_delay": 100,
      "max_memory_restart": "300M",
      "kill_timeout": 5000,
      "env": {"NODE_ENV": "production", "PORT": 3000},
      "env_staging": {"NODE_ENV": "staging"},
      "cwd": "CWD",
      "watch": true
    },
    {
      "name": "report job",
      "script": "report.py",
      "interpreter": "python3",
      "args": ["--day", "today"],
      "autorestart": false,
      "restart_delay": 2500,
      "cron_restart": "0 3 * * *"
    },
    {"script": "bin/worker", "interpreter": "none", "min_uptime": "5s"}
  ]
"""


def roundtrip(tmp_path: Path, text: str) -> dict[str, object]:
    """Load the generated orch.toml with orch's loader and build every task from it."""
    path = tmp_path / "orch.toml"
    path.write_text(text)
    cfg = load_config(str(path))
    for name in cfg.tasks:
        build_task(
            name=name,
            file_task=cfg.task(name),
            file_path=str(path),
            overrides={},
            cwd=str(tmp_path),
        )
    ops_config(cfg)
    return tomllib.loads(text)


def test_supervisor_programs(tmp_path: Path) -> None:
    conf = tmp_path / "supervisord.conf"
    conf.write_text(SUPERVISOR.format(cwd=tmp_path))
    text = import_file(str(conf), environ={"HOME": "/home/ops"})
    doc = roundtrip(tmp_path, text)
    tasks = doc["tasks"]
    assert isinstance(tasks, dict)
    crawler = tasks["crawler"]
    assert crawler["command"] == "/usr/bin/php crawl.php --worker={index} --name=crawler"
    assert crawler["split"] == 4 and crawler["restart"] == "on-failure"
    assert crawler["backoff_reset"] == "10s" and crawler["max_restarts"] == 5
    assert crawler["stop_timeout"] == "30s" and crawler["cwd"] == str(tmp_path)
    assert crawler["log_max_size"] == "50MB" and crawler["log_backups"] == 5
    assert crawler["env"] == {"APP_ENV": "prod", "LIST": "a,b", "HOME_DIR": "/home/ops"}
    listener = tasks["listener"]
    assert listener["range"] == "9000..9001" and listener["restart"] == "always"
    assert listener["command"] == "python3 listen.py --port={value} {{literal}}"  # literal braces
    assert tasks["once"]["restart"] == "never" and tasks["once"]["split"] == 1
    # supervisord starts every program unless autostart=false: orch serve's services
    assert crawler["autostart"] is True and listener["autostart"] is True
    assert "autostart" not in tasks["once"]
    for unmapped in (
        "# exitcodes = 0,2",
        "# stopsignal = INT",
        "# user = www-data",
        "# stdout_logfile = /var/log/crawler.out.log",
        "# priority = 10",
        "# [group:all] not imported",
        "# [include] files = conf.d/*.conf",
        "# stopasgroup = true: orch always signals the whole process group",
        "# process_name = %(program_name)s_%(process_num)02d",
        "# ENV_HOME: expanded at import time",
    ):
        assert unmapped in text, unmapped


def test_pm2_json(tmp_path: Path) -> None:
    eco = tmp_path / "ecosystem.config.json"
    eco.write_text("{" + PM2_APPS.replace("CWD", str(tmp_path)) + "}")
    text = import_file(str(eco))
    doc = roundtrip(tmp_path, text)
    tasks = doc["tasks"]
    assert isinstance(tasks, dict)
    api = tasks["api"]
    assert api["command"] == ["node", "server.js", "--port", "3000", "--verbose"]
    assert api["split"] == 4 and api["restart"] == "always" and api["max_restarts"] == 10
    assert api["autostart"] is True and "autostart" not in tasks["report_job"]
    assert api["backoff_initial"] == "100ms" and api["backoff_factor"] == 1.5
    assert api["max_memory"] == "300M" and api["stop_timeout"] == "5s"
    assert api["env"] == {"NODE_ENV": "production", "PORT": "3000", "NODE_APP_INSTANCE": "{index}"}
    job = tasks["report_job"]
    assert job["command"] == ["python3", "report.py", "--day", "today"]
    assert job["restart"] == "never" and job["backoff_initial"] == job["backoff_max"] == "2500ms"
    assert job["schedule"] == "0 3 * * *" and job["overlap"] == "replace"
    worker = tasks["worker"]
    assert worker["command"] == ["bin/worker"] and worker["backoff_reset"] == "5s"
    for unmapped in ("# exec_mode = ", "# watch = true", "# env_staging: ", "# app 'report job'"):
        assert unmapped in text, unmapped


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("ecosystem.config.js", "module.exports = {" + PM2_APPS + "};"),
        (
            "ecosystem.config.cjs",
            "const apps = {" + PM2_APPS + "}.apps;\nmodule.exports = { apps };",
        ),
        ("ecosystem.config.mjs", "export default {" + PM2_APPS + "};"),
    ],
)
def test_pm2_javascript_through_node(tmp_path: Path, name: str, body: str) -> None:
    eco = tmp_path / name
    eco.write_text(body.replace("CWD", str(tmp_path)))
    doc = roundtrip(tmp_path, import_file(str(eco)))
    tasks = doc["tasks"]
    assert isinstance(tasks, dict) and list(tasks) == ["api", "report_job", "worker"]


def test_pm2_javascript_without_node_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    eco = tmp_path / "ecosystem.config.js"
    eco.write_text("module.exports = {apps: []};")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no node on this PATH
    with pytest.raises(ConfigError, match="needs node to be read, and node is not installed"):
        import_file(str(eco))


def test_broken_javascript_names_the_file(tmp_path: Path) -> None:
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    eco = tmp_path / "bad.config.js"
    eco.write_text("module.exports = {apps: [")
    with pytest.raises(ConfigError, match="bad.config.js: node could not evaluate it"):
        import_file(str(eco))


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("notes.txt", "just some text\n"),
        ("settings.ini", "[server]\nport = 80\n"),
        ("package.json", '{"name": "x", "version": "1.0.0"}'),
        ("empty.conf", ""),
        ("binary.conf", b"\xff\xfe\x00garbage"),
    ],
)
def test_neither_kind_is_exit_2_naming_the_file(
    tmp_path: Path, name: str, body: str | bytes
) -> None:
    path = tmp_path / name
    if isinstance(body, bytes):
        path.write_bytes(body)
    else:
        path.write_text(body)
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "import", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("orch: ") and name in line


def test_import_prints_toml_on_stdout(tmp_path: Path) -> None:
    conf = tmp_path / "supervisord.conf"
    conf.write_text("[program:web]\ncommand=./web --port 80\nautorestart=true\n")
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "import", str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert tomllib.loads(done.stdout)["tasks"]["web"] == {
        "command": "./web --port 80",
        "split": 1,
        "autostart": True,
        "restart": "always",
    }
