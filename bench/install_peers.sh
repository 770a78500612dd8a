#!/usr/bin/env bash
# Install the process managers orch is benchmarked against (see
# docs/performance.md). Idempotent: run it as often as you like.
#
#   supervisor, circus  -> a separate venv ($BENCH_PEERS, default /tmp/bench-peers),
#                          never the project's venv
#   pm2                 -> npm into a local prefix ($BENCH_PEERS/npm)
#   GNU parallel        -> apt-get (when run as root)
#   tqdm, py-spy        -> the project's Python (the one running `python -m bench`)
#
# A peer that cannot be installed is reported and later shown as
# "skipped (not installed)" by `python -m bench`.
set -u

PEERS="${BENCH_PEERS:-/tmp/bench-peers}"
PY="${PYTHON:-python3}"          # builds the peers' venv
if [ -z "${PROJECT_PY:-}" ]; then
  if [ -x /tmp/venv/bin/python ]; then PROJECT_PY=/tmp/venv/bin/python; else PROJECT_PY=$(command -v python3); fi
fi
status=0
say() { printf 'install_peers: %s\n' "$*"; }

# --- supervisor + circus in their own venv ---------------------------------
if [ ! -x "$PEERS/venv/bin/python" ]; then
  "$PY" -m venv "$PEERS/venv" || { say "cannot create $PEERS/venv"; status=1; }
fi
if [ -x "$PEERS/venv/bin/python" ]; then
  VPIP="$PEERS/venv/bin/pip"
  "$VPIP" install -q --upgrade pip >/dev/null 2>&1 || true
  if "$PEERS/venv/bin/supervisord" --version >/dev/null 2>&1; then
    say "supervisor $("$PEERS/venv/bin/supervisord" --version) already installed"
  elif "$VPIP" install -q 'supervisor>=4.2'; then
    say "supervisor $("$PEERS/venv/bin/supervisord" --version) installed"
  else
    say "supervisor: pip install failed (shown as skipped)"; status=1
  fi
  if "$PEERS/venv/bin/python" -c 'import circus' >/dev/null 2>&1; then
    say "circus already installed"
  # circus 0.19 works with current pyzmq/tornado on Python 3.11; pin known-good ranges.
  elif "$VPIP" install -q 'circus>=0.18,<0.20' 'pyzmq>=25,<28' 'tornado>=6.2,<7' psutil; then
    say "circus installed"
  else
    say "circus: pip install failed on $("$PY" --version) (shown as skipped)"; status=1
  fi
fi

# --- pm2 into a local npm prefix ---------------------------------------------
if command -v npm >/dev/null 2>&1; then
  if [ -x "$PEERS/npm/bin/pm2" ]; then
    say "pm2 already installed"
  elif npm install -g --silent --prefix "$PEERS/npm" pm2 >/dev/null 2>&1; then
    say "pm2 installed in $PEERS/npm"
  else
    say "pm2: npm install failed (shown as skipped)"; status=1
  fi
else
  say "npm not found: pm2 shown as skipped"
fi

# --- GNU parallel from Debian ---------------------------------------------------
if command -v parallel >/dev/null 2>&1 && parallel --version 2>/dev/null | grep -q 'GNU parallel'; then
  say "GNU parallel already installed"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq >/dev/null 2>&1 || true
  if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq parallel >/dev/null 2>&1; then
    say "GNU parallel installed"
  else
    say "GNU parallel: apt-get install failed (shown as skipped)"; status=1
  fi
else
  say "GNU parallel: not root or no apt-get (shown as skipped)"
fi

# --- tqdm (SDK comparison) and py-spy (profiling) in the project's Python ----------
if "$PROJECT_PY" -c 'import tqdm' >/dev/null 2>&1; then
  say "tqdm already installed"
else
  "$PROJECT_PY" -m pip install -q tqdm || { say "tqdm: pip install failed"; status=1; }
fi
if "$PROJECT_PY" -m pip show -q py-spy >/dev/null 2>&1; then
  say "py-spy already installed"
else
  "$PROJECT_PY" -m pip install -q py-spy || say "py-spy: pip install failed (profiling only)"
fi
exit $status
