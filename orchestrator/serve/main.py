"""``orch serve``: check the flags, bind, print the URL with the token, run uvicorn.

The socket is bound here, before uvicorn starts, so ``--port 0`` knows its
port for the first line of output and for the Host check.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import secrets
import socket
import sys
from typing import Any

from orchestrator.serve import data
from orchestrator.serve.data import BadUsage as UsageError


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def _url_host(host: str) -> str:
    if _is_wildcard(host):
        return "127.0.0.1"
    h = host.strip("[]")
    return f"[{h}]" if ":" in h else h


def allowed_hosts(host: str, port: int) -> frozenset[str] | None:
    """The Host header values this server answers to; None for a wildcard bind (any)."""
    if _is_wildcard(host):
        return None
    names = {_url_host(host).lower()}
    if is_loopback(host):
        names |= {"localhost", "127.0.0.1", "[::1]"}
    out = {f"{n}:{port}" for n in names}
    if port == 80:
        out |= names
    return frozenset(out)


def _bind(host: str, port: int) -> socket.socket:
    h = host.strip("[]")
    try:
        infos = socket.getaddrinfo(h, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: cannot resolve ({exc.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(
    *,
    host: str,
    port: int,
    config: str | None,
    home: str | None,
    token: str | None,
    read_only: bool,
    no_auth: bool,
) -> int:
    if no_auth and not is_loopback(host):
        raise UsageError(
            f"--no-auth is allowed only on a loopback host, not {host} "
            "(anyone who can reach it could stop your runs)"
        )
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port}: must be from 0 to 65535")
    # Heavy imports only here: no other command pays for the web stack.
    import uvicorn

    from orchestrator.serve.app import Settings, build_app
    from orchestrator.serve.guard import Guard

    config_path: str | None
    if config is not None:
        config_path = os.path.abspath(config)
        data.check_config(config_path)  # a missing or broken file is a one-line error now
    else:
        default = os.path.abspath(data.DEFAULT_CONFIG)
        config_path = default if os.path.isfile(default) else None
        if config_path is not None:
            data.check_config(config_path)
    if no_auth:
        the_token = None
    else:
        the_token = token or os.environ.get("ORCH_TOKEN") or secrets.token_urlsafe(24)
    settings = Settings(home=data.home_dir(home), config_path=config_path, read_only=read_only)
    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    app = build_app(settings)
    guarded = Guard(app, token=the_token, hosts=allowed_hosts(host, bound), read_only=read_only)
    url = f"http://{_url_host(host)}:{bound}/"
    if the_token is not None:
        url += f"?token={the_token}"
    print(f"orch serve: {url}", flush=True)
    print(
        f"orch serve: runs in {settings.home}; tasks from {config_path or '(no orch.toml)'}"
        + ("; read-only" if read_only else ""),
        flush=True,
    )
    cfg = uvicorn.Config(
        guarded,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=2,
        server_header=False,
    )
    server = _quiet_server(uvicorn, cfg)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    sys.stdout.flush()
    return data.EXIT_OK


def _orch_executable() -> list[str]:
    """The absolute path of the ``orch`` executable of this installation."""
    import shutil

    beside = os.path.join(os.path.dirname(sys.executable), "orch")
    if os.access(beside, os.X_OK):
        return [os.path.abspath(beside)]
    found = shutil.which("orch")
    if found:
        return [os.path.abspath(found)]
    return [os.path.abspath(sys.executable), "-m", "orchestrator"]


def _unit_quote(arg: str) -> str:
    """One ExecStart word: ``%`` escaped for systemd, quoted when it has spaces or quotes."""
    arg = arg.replace("%", "%%")
    if arg and not any(c in arg for c in " \t\"'\\;$"):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_unit(
    *,
    host: str,
    port: int,
    config: str | None,
    home: str | None,
    read_only: bool,
    no_auth: bool,
    token_given: bool,
) -> str:
    """A systemd user unit that starts this ``orch serve`` at boot and restarts it on failure.

    The token is never written into the unit: it comes from ``ORCH_TOKEN`` in
    ``~/.config/orch/serve.env`` (optional), so a token passed with ``--token``
    is only mentioned there.
    """
    the_home = os.path.abspath(data.home_dir(home))
    config_path: str | None
    if config is not None:
        config_path = os.path.abspath(config)
    else:
        default = os.path.abspath(data.DEFAULT_CONFIG)
        config_path = default if os.path.isfile(default) else None
    args = [*_orch_executable(), "serve", "--host", host, "--port", str(port)]
    if config_path is not None:
        args += ["--config", config_path]
    args += ["--home", the_home]
    if read_only:
        args.append("--read-only")
    if no_auth:
        args.append("--no-auth")
    workdir = os.path.dirname(config_path) if config_path else the_home
    token_note = (
        "# --token is not written here: put ORCH_TOKEN=... in ~/.config/orch/serve.env (0600)\n"
        if token_given
        else "# A fixed token (else a new random one at each start): ORCH_TOKEN=... in\n"
        "# ~/.config/orch/serve.env (0600).\n"
    )
    return (
        "# orch serve as a systemd user service; install with:\n"
        "#   orch serve ... --print-systemd-unit > ~/.config/systemd/user/orch-serve.service\n"
        "#   systemctl --user daemon-reload && systemctl --user enable --now orch-serve\n"
        "#   loginctl enable-linger $USER   # start at boot, without a login\n"
        + token_note
        + "[Unit]\n"
        "Description=orch serve (dashboard, schedules, services)\n"
        "After=network.target\n"
        "\n"
        "[Service]\n"
        "Type=simple\n"
        f"ExecStart={' '.join(_unit_quote(a) for a in args)}\n"
        f"WorkingDirectory={_unit_quote(workdir)}\n"
        f"Environment={_unit_quote('ORCH_HOME=' + the_home)}\n"
        "EnvironmentFile=-%h/.config/orch/serve.env\n"
        "Restart=on-failure\n"
        "RestartSec=2\n"
        "KillMode=process\n"
        "\n"
        "[Install]\n"
        "WantedBy=default.target\n"
    )


#: uvicorn's housekeeping tick (the Date header, the exit flag) is 0.1 s; a second is
#: enough for a header with one-second resolution, and a signal still stops the
#: server at once (``handle_exit`` wakes the loop).
TICK_S = 1.0


def _quiet_server(uvicorn: Any, cfg: Any) -> Any:
    """A ``uvicorn.Server`` that wakes once a second when idle instead of ten times.

    Half of an idle ``orch serve``'s CPU was uvicorn's 0.1 s main loop
    (bench/m_sched.py: 0.33 % of a core before, see docs/serve.md).
    """

    class QuietServer(uvicorn.Server):  # type: ignore[misc,name-defined]
        _wake: asyncio.Event | None = None
        _loop: asyncio.AbstractEventLoop | None = None

        async def main_loop(self) -> None:
            self._loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            counter = 0
            while not await self.on_tick(counter):
                counter = (counter + 10) % 864_000  # on_tick refreshes the Date every 10th
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), TICK_S)

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            if self._loop is not None and self._wake is not None:
                self._loop.call_soon_threadsafe(self._wake.set)

    return QuietServer(cfg)
