"""The ``orch`` command line.

The CLI is the edge: it builds the one immutable ``TaskConfig`` (CLI >
orch.toml > defaults), reads and validates the shard list and the command
template, and only then creates a run. Every user mistake surfaces as an
``OrchError`` printed as ``orch: <one line>`` with exit code 2; nothing has
been started when that happens.

Each command imports the module that carries it out inside its function:
``orch status`` must not pay for the master's stack, nor ``orch run`` for
the status tables (start-up time is a measured figure).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from orchestrator import __version__
from orchestrator.errors import RET_USAGE, OrchError, UsageError


class _RunCommand(click.Command):
    """Remembers how many arguments came after ``--`` (the command to run)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["after_dashdash"] = len(args) - args.index("--") - 1 if "--" in args else None
        return super().parse_args(ctx, args)


def _home_option(f: Any) -> Any:
    return click.option(
        "--home", metavar="DIR", help="orch's home (default $ORCH_HOME, else $XDG_STATE_HOME/orch)."
    )(f)


class _ReaderLeft(Exception):
    """Raised when whoever reads orch's output went away (``orch logs RUN | head``)."""


def _drop_stdout() -> None:
    """Send what is left to print to /dev/null: nobody reads it any more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


#: Commands whose output is all they do: their reader leaving early is not an error. The
#: others (orch run, resume, wait ...) keep an exit code that says how the run went.
_READ_ONLY_OUTPUT = frozenset({"status", "logs", "events", "schedules", "import"})


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            if ctx.invoked_subcommand not in _READ_ONLY_OUTPUT:
                raise
            # Past click, which would make this exit 1: the reader leaving is not an error.
            _drop_stdout()
            raise _ReaderLeft from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="orch")
def cli() -> None:
    """orch: run a command once per shard, supervised, with progress and checkpoints."""


@cli.command(cls=_RunCommand, context_settings={"allow_interspersed_args": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option(
    "--shards", "shards_path", metavar="FILE", help="Shard list: CSV, JSON lines or text."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "tsv", "jsonl", "text"]),
    help="Shard list format (default: from the file extension).",
)
@click.option("--split", type=int, metavar="N", help="N shards numbered 0..N-1.")
@click.option("--range", "range_", metavar="A..B", help="One shard per integer A..B (inclusive).")
@click.option("--config", "config_path", metavar="FILE", help="Task file (default ./orch.toml).")
@click.option("-j", "--jobs", type=int, metavar="K", help="At most K shards run at once.")
@click.option("--restart", type=click.Choice(["on-failure", "always", "never"]))
@click.option(
    "--max-restarts", type=int, metavar="N", help="Restarts allowed after the first attempt."
)
@click.option("--stop-timeout", metavar="DUR", help="Grace between SIGTERM and SIGKILL.")
@click.option("--backoff-initial", metavar="DUR")
@click.option("--backoff-max", metavar="DUR")
@click.option("--backoff-reset", metavar="DUR", help="Healthy stretch that resets the backoff.")
@click.option("--heartbeat-interval", metavar="DUR")
@click.option("--heartbeat-timeout", metavar="DUR")
@click.option("--stall-timeout", metavar="DUR")
@click.option("--require-heartbeat", is_flag=True, default=None)
@click.option("--max-memory", metavar="SIZE", help="Restart an attempt whose RSS exceeds SIZE.")
@click.option(
    "--env", "env", multiple=True, metavar="KEY=VALUE", help="Extra environment (templated)."
)
@click.option("--cwd", metavar="DIR")
@click.option(
    "--shell", is_flag=True, default=None, help="Run the command with /bin/sh -c, values quoted."
)
@click.option(
    "--backend",
    type=click.Choice(["local", "ray"]),
    help="Where attempts run: local children (default) or a Ray cluster (docs/scale-out.md).",
)
@click.option("--ray-address", metavar="HOST:PORT", help="The Ray cluster to use (default: auto).")
@click.option("--shard-cpus", type=float, metavar="N", help="CPUs each attempt reserves (ray).")
@click.option("--shard-memory", metavar="SIZE", help="Memory each attempt reserves (ray).")
@click.option("--name", metavar="NAME", help="A name to refer to the run by.")
@click.option(
    "--allow-concurrent",
    is_flag=True,
    help="Start even while a run of this name is live (default: refused, exit 2).",
)
@click.option(
    "--final-exit-codes",
    metavar="CODES",
    help="Exit codes that fail a shard at once, without restarts (4,44).",
)
@click.option(
    "--max-failed",
    type=int,
    metavar="N",
    help="Once more than N shards failed, stop the rest; the run ends failed.",
)
@click.option("-v", "--verbose", is_flag=True, help="Stream child output, prefixed by shard id.")
@click.option("-d", "--detach", is_flag=True, help="Run in the background; print the run id.")
@_home_option
@click.pass_context
def run(ctx: click.Context, args: tuple[str, ...], **opts: Any) -> None:
    """Run a task once per shard: orch run [TASK] [OPTIONS] [-- COMMAND...]"""
    from orchestrator import launch  # lazy: start-up time (see above)

    after = ctx.meta.get("after_dashdash")
    head: tuple[str, ...]
    command: tuple[str, ...]
    if after is None:
        head, command = args, ()
    else:
        head, command = args[: len(args) - after], args[len(args) - after :]
    if len(head) > 1:
        raise UsageError(
            f"unexpected arguments {' '.join(head[1:])!r}: put the command after '--' "
            "(orch run --split 4 -- ./job.sh {index})"
        )
    sys.exit(launch.run_command(head[0] if head else None, command, opts))


@cli.command()
@click.argument("run_key", metavar="[RUN]", required=False)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Machine-readable output (schema: docs/cli.md, 'orch status --json').",
)
@click.option("--all", "show_all", is_flag=True, help="List every run, not only the last 20.")
@_home_option
def status(run_key: str | None, as_json: bool, show_all: bool, home: str | None) -> None:
    """List runs, newest first, or show one RUN shard by shard."""
    from orchestrator.views import status as show  # lazy: start-up time (see above)

    sys.exit(show.status(run_key, as_json=as_json, show_all=show_all, home=home))


@cli.command()
@click.argument("run_key", metavar="RUN")
@click.option("--shard", metavar="ID", help="One shard (by id, or by index).")
@click.option("--stdout", is_flag=True, help="Only stdout.")
@click.option("--stderr", is_flag=True, help="Only stderr.")
@click.option("--protocol", is_flag=True, help="Also show the ##orch protocol lines.")
@click.option("-n", "--tail", type=int, metavar="N", help="Only the last N lines.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing lines as they are written.")
@_home_option
def logs(
    run_key: str,
    shard: str | None,
    stdout: bool,
    stderr: bool,
    protocol: bool,
    tail: int | None,
    follow: bool,
    home: str | None,
) -> None:
    """Show a run's output, stdout and stderr interleaved in time order (stderr marked):
    one shard, or all shards with a prefix."""
    from orchestrator.views import logs as show  # lazy: start-up time (see above)

    sys.exit(
        show.logs(
            run_key,
            shard=shard,
            stdout=stdout,
            stderr=stderr,
            protocol=protocol,
            tail=tail,
            follow=follow,
            home=home,
        )
    )


@cli.command()
@click.argument("run_key", metavar="RUN")
@click.option("--shard", metavar="ID", help="Stop only this shard.")
@_home_option
def stop(run_key: str, shard: str | None, home: str | None) -> None:
    """Stop a live run (SIGTERM, grace, SIGKILL), or one of its shards."""
    from orchestrator import steer  # lazy: start-up time (see above)

    sys.exit(steer.stop(run_key, shard, home))


@cli.command()
@click.argument("run_key", metavar="RUN")
@click.option("--shard", metavar="ID", help="Only this shard (default: every running shard).")
@click.option(
    "--rolling",
    type=click.IntRange(min=1, max=2**63 - 1),
    metavar="K",
    help="Restart at most K at a time, the next once a restarted one runs again.",
)
@_home_option
def restart(run_key: str, shard: str | None, rolling: int | None, home: str | None) -> None:
    """Start new attempts now, backoff reset: of one shard, or of every running shard."""
    from orchestrator import steer  # lazy: start-up time (see above)

    sys.exit(steer.restart(run_key, shard, home, rolling=rolling))


@cli.command()
@click.argument("run_key", metavar="RUN")
@click.option("-j", "--jobs", type=click.IntRange(min=1, max=2**63 - 1), required=True, metavar="K")
@_home_option
def scale(run_key: str, jobs: int, home: str | None) -> None:
    """Change how many shards of a live run may run at once."""
    from orchestrator import steer  # lazy: start-up time (see above)

    sys.exit(steer.scale(run_key, jobs, home))


@cli.command()
@click.argument("run_key", metavar="RUN")
@click.option(
    "--timeout", metavar="DUR", help="Give up after DUR (30s, 5m): exit 124, the run goes on."
)
@_home_option
def wait(run_key: str, timeout: str | None, home: str | None) -> None:
    """Block until RUN ends; exit with its exit code (124 on --timeout)."""
    from orchestrator import steer  # lazy: start-up time (see above)
    from orchestrator.units import parse_duration

    timeout_s = None if timeout is None else parse_duration(timeout, where="--timeout")
    sys.exit(steer.wait(run_key, home, timeout_s))


@cli.command()
@click.argument("run_key", metavar="RUN")
@click.option("-d", "--detach", "detach_", is_flag=True, help="Resume in the background.")
@click.option("-v", "--verbose", is_flag=True)
@click.option("--retry-failed", is_flag=True, help="Also restart shards that gave up.")
@click.option(
    "--env",
    "env",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override the run's environment (templated; kept for later resumes).",
)
@_home_option
def resume(
    run_key: str,
    detach_: bool,
    verbose: bool,
    retry_failed: bool,
    env: tuple[str, ...],
    home: str | None,
) -> None:
    """Finish a stopped or lost run with the environment it started with: unfinished
    shards restart from their checkpoints."""
    from orchestrator import steer  # lazy: start-up time (see above)
    from orchestrator.start import env_pairs

    sys.exit(steer.resume(run_key, home, detach_, verbose, retry_failed, env_pairs(env)))


@cli.command()
@click.argument("run_key", metavar="RUN")
@_home_option
def events(run_key: str, home: str | None) -> None:
    """Print a live run's shard state changes as JSON lines until it ends."""
    from orchestrator import steer  # lazy: start-up time (see above)

    sys.exit(steer.events(run_key, home))


def _permission_problem(exc: PermissionError) -> str:
    """One line naming the path, the refusal, and whose the path is."""
    path = str(exc.filename or "?")
    line = f"{path}: {exc.strerror or 'permission denied'}"
    where = path
    while where not in ("", os.sep):  # the nearest directory we can see, and its owner
        try:
            owner = os.stat(where).st_uid
        except OSError:
            where = os.path.dirname(where)
            continue
        if owner != os.geteuid():
            line += (
                f" ({where} belongs to uid {owner}, you are uid {os.geteuid()}: "
                "run orch as that user, or give another --home)"
            )
        break
    return line


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", type=int, default=9001, show_default=True, help="Port (0 picks a free one)."
)
@click.option("--config", "config_path", metavar="FILE", help="Tasks a front end may start.")
@click.option(
    "--token", metavar="TOKEN", help="The access token (default $ORCH_TOKEN, else random)."
)
@click.option("--read-only", is_flag=True, help="Refuse every change (403).")
@click.option("--no-auth", is_flag=True, help="No token (loopback hosts only).")
@click.option(
    "--print-systemd-unit",
    is_flag=True,
    help="Print a systemd unit that keeps this orch serve running, and exit.",
)
@_home_option
def serve(
    host: str,
    port: int,
    config_path: str | None,
    token: str | None,
    read_only: bool,
    no_auth: bool,
    print_systemd_unit: bool,
    home: str | None,
) -> None:
    """Serve the web dashboard, JSON API, events and /metrics for every run.

    It also fires the schedules of orch.toml, starts its autostart services
    and prunes daily with [gc]."""
    from orchestrator.serve import main as serve_main

    if print_systemd_unit:
        click.echo(
            serve_main.systemd_unit(
                host=host,
                port=port,
                config=config_path,
                home=home,
                read_only=read_only,
                no_auth=no_auth,
                token_given=token is not None,
            ),
            nl=False,
        )
        sys.exit(0)
    sys.exit(
        serve_main.serve(
            host=host,
            port=port,
            config=config_path,
            home=home,
            token=token,
            read_only=read_only,
            no_auth=no_auth,
        )
    )


@cli.command()
@click.option("--config", "config_path", metavar="FILE", help="Task file (default ./orch.toml).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_home_option
def schedules(config_path: str | None, as_json: bool, home: str | None) -> None:
    """List each scheduled task of orch.toml with its last and next fire."""
    from orchestrator.serve.ops import schedules_command

    sys.exit(schedules_command(config_path, home, as_json))


@cli.command("import")
@click.argument("file", metavar="FILE")
def import_(file: str) -> None:
    """Print an orch.toml equivalent to a supervisord.conf or pm2 ecosystem file."""
    from orchestrator.migrate import import_file

    click.echo(import_file(file), nl=False)


@cli.command()
@click.option("--keep", type=int, metavar="N", help="Keep the N newest finished runs.")
@click.option("--older-than", metavar="DUR", help="Only runs that ended more than DUR ago.")
@click.option("-n", "--dry-run", is_flag=True, help="Only show what would be removed.")
@_home_option
def gc(keep: int | None, older_than: str | None, dry_run: bool, home: str | None) -> None:
    """Delete finished runs (never a live one) and print what that freed."""
    from orchestrator.prune import gc_command

    sys.exit(gc_command(home, keep, older_than, dry_run))


@cli.group()
def notify() -> None:
    """Notification channels ([notify.NAME] in orch.toml)."""


@notify.command("test")
@click.argument("channel", metavar="CHANNEL")
@click.option("--config", "config_path", metavar="FILE", help="Task file (default ./orch.toml).")
def notify_test(channel: str, config_path: str | None) -> None:
    """Send a test message to CHANNEL and print the receiver's answer."""
    from orchestrator.notify.command import notify_test

    sys.exit(notify_test(channel, config_path))


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors, named exit codes, never a traceback for a user mistake."""
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            # Started with the descriptor closed (`orch run ... >&-`): print to /dev/null,
            # which also takes the descriptor before a log or the database could get it.
            setattr(sys, name, open(os.devnull, "w"))  # noqa: SIM115
    try:
        try:
            cli.main(args=argv, prog_name="orch", standalone_mode=False)
        finally:
            try:
                sys.stdout.flush()  # a reader that left shows here at the latest
            except BrokenPipeError:
                _drop_stdout()  # and the command's own exit code stands
    except _ReaderLeft:
        sys.exit(0)
    except OrchError as exc:
        click.echo(f"orch: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        if type(exc).__name__.startswith("NoArgsIsHelp") and exc.ctx is not None:
            click.echo(exc.ctx.get_help())
            sys.exit(RET_USAGE)
        ctx = exc.ctx
        hint = f" ({ctx.command_path} --help)" if ctx is not None and ctx.parent is not None else ""
        click.echo(f"orch: {exc.format_message()}{hint}", err=True)
        sys.exit(RET_USAGE)
    except click.exceptions.Abort:
        click.echo("orch: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"orch: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except PermissionError as exc:
        # A home another user owns (a run started with sudo, `orch status` without it).
        click.echo(f"orch: {_permission_problem(exc)}", err=True)
        sys.exit(RET_USAGE)
    except BrokenPipeError:
        # `orch logs RUN | head`, seen outside a command: the reader left; not an error.
        _drop_stdout()
        sys.exit(0)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
