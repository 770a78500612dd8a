"""``orch serve``: check the flags, bind, print the URL with the token, run uvicorn.

The socket is bound here, before uvicorn starts, so ``--port 0`` knows its
port for the first line of output and for the Host check.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import sys

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
    server = uvicorn.Server(cfg)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    sys.stdout.flush()
    return data.EXIT_OK
