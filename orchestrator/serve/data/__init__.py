"""The one place ``orch serve`` touches orch's internals.

Everything the web server knows about runs comes through the small functions
here: listing and resolving runs, the status records (the same objects as
``orch status --json``), shard pages, attempts, log slices, the control
client, the event feed, and starting or resuming a run. The rest of
``orchestrator/serve`` imports only this package, so a change inside the core
is absorbed here. Its parts: ``runs`` (listing, records, facts, aggregates,
shard pages), ``shards`` (one shard: record, attempts, logs) and ``steer``
(control requests, the event feed, starting and resuming runs).

Everything is read-only: stores are opened with ``mode=ro`` (WAL readers
never block the master), and starting or resuming a run goes through the same
``python -m orchestrator`` entry point a user would type, detached.

Environment values never leave this module: every object built here has its
task's ``env`` values replaced by ``REDACTED``.
"""

from orchestrator.errors import MasterUnreachable
from orchestrator.serve.data.runs import (
    DEFAULT_CONFIG,
    EXIT_OK,
    REDACTED,
    SAMPLER,
    SORTS,
    STATES,
    UNFINISHED,
    VERSION,
    BadUsage,
    NotFound,
    OrchError,
    RunDir,
    RunFacts,
    Sampler,
    aggregates,
    aggregates_light,
    db_files,
    eta_s,
    home_dir,
    list_runs,
    master_alive,
    rate_between,
    resolve,
    run_detail,
    run_dirs,
    run_facts,
    running_progress,
    runs_root,
    shard_metrics,
    shard_page,
    shard_states,
)
from orchestrator.serve.data.shards import (
    attempts,
    attention,
    log_path,
    log_slice,
    read_log,
    shard_detail,
    shard_id,
)
from orchestrator.serve.data.steer import (
    StartFailed,
    check_config,
    follow_events,
    resume_run,
    send,
    start_task,
    task_list,
    task_names,
)

__all__ = [
    "DEFAULT_CONFIG",
    "EXIT_OK",
    "REDACTED",
    "SAMPLER",
    "SORTS",
    "STATES",
    "UNFINISHED",
    "VERSION",
    "BadUsage",
    "MasterUnreachable",
    "NotFound",
    "OrchError",
    "RunDir",
    "RunFacts",
    "Sampler",
    "StartFailed",
    "aggregates",
    "aggregates_light",
    "attempts",
    "attention",
    "check_config",
    "db_files",
    "eta_s",
    "follow_events",
    "home_dir",
    "list_runs",
    "log_path",
    "log_slice",
    "master_alive",
    "rate_between",
    "read_log",
    "resolve",
    "resume_run",
    "run_detail",
    "run_dirs",
    "run_facts",
    "running_progress",
    "runs_root",
    "send",
    "shard_detail",
    "shard_id",
    "shard_metrics",
    "shard_page",
    "shard_states",
    "start_task",
    "task_list",
    "task_names",
]
