#!/usr/bin/env bash
# Stop the cluster started by cluster/local/start-local.sh, or one node of it.
#
#   cluster/local/stop-local.sh              # this cluster only: the processes under its temp dir
#   cluster/local/stop-local.sh --node IP    # one node of it: the loss of a machine
#   cluster/local/stop-local.sh --all        # `ray stop --force`: every Ray process on the machine
#
# Environment: RAY_PORT (default 6379) or RAY_LOCAL_DIR (default /tmp/ray-local-$RAY_PORT),
# as given to start-local.sh.
#
# The default finds the cluster's processes by id: those whose command line names
# RAY_LOCAL_DIR (GCS, raylets, monitors, agents) and all their descendants (the worker
# processes, which rename themselves ray::...). They get SIGTERM, then SIGKILL after 5 s.
# `--node IP` does the same to the pids start-local.sh recorded for that node in
# $RAY_LOCAL_DIR/node-IP.pids (its raylet and log monitor) and their descendants; a
# recorded pid counts only while its command line still names RAY_LOCAL_DIR, so a
# recycled pid is never signalled. The rest of the cluster keeps running; the GCS
# declares the node dead when its raylet is gone.
# `--all` runs `ray stop --force`, which kills by process name every Ray process of
# this user, including other clusters, ray.init() instances and running tests.
set -euo pipefail
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [[ "${1:-}" == "--all" ]]; then
  if [[ -z "${RAY:-}" ]]; then
    if command -v ray >/dev/null 2>&1; then RAY="$(command -v ray)"
    elif [[ -x "$here/../../.venv/bin/ray" ]]; then RAY="$here/../../.venv/bin/ray"
    else echo "stop-local.sh: no ray CLI (set RAY=/path/to/ray)" >&2; exit 2
    fi
  fi
  exec "$RAY" stop --force
fi
NODE=""
if [[ "${1:-}" == "--node" && -n "${2:-}" && -z "${3:-}" ]]; then
  NODE="$2"
elif [[ -n "${1:-}" ]]; then
  echo "usage: stop-local.sh [--all | --node IP]" >&2; exit 2
fi

RAY_PORT="${RAY_PORT:-6379}"
RAY_LOCAL_DIR="${RAY_LOCAL_DIR:-/tmp/ray-local-$RAY_PORT}"
RAY_LOCAL_DIR="${RAY_LOCAL_DIR%/}"

# The head's address, written by start-local.sh (the Ray client server names only it).
ADDR=""
[[ -r "$RAY_LOCAL_DIR/address" ]] && ADDR="$(cat "$RAY_LOCAL_DIR/address")"

# With --node, the seeds are that node's recorded pids instead of the whole cluster.
SEEDS=""
if [[ -n "$NODE" ]]; then
  record="$RAY_LOCAL_DIR/node-$NODE.pids"
  if [[ ! -r "$record" ]]; then
    echo "stop-local.sh: no node $NODE in $RAY_LOCAL_DIR (no $record)" >&2; exit 2
  fi
  SEEDS=" $(tr "\n" " " < "$record")"
  ADDR=""
fi

# The cluster's processes and their descendants, from one `ps` snapshot: Ray programs
# (a path with /ray/ in it) whose command line names RAY_LOCAL_DIR, the head's Ray client
# server, then all their children.
cluster_pids() {
  ps -eo pid=,ppid=,args= | DIR="$RAY_LOCAL_DIR/" ADDR="$ADDR" SEEDS="$SEEDS" awk '
    { pid[NR] = $1; ppid[NR] = $2
      seed = ENVIRON["SEEDS"] == "" || index(ENVIRON["SEEDS"], " " $1 " ") > 0
      if (seed && index($0, ENVIRON["DIR"]) > 0 && index($0, "/ray/") > 0) keep[$1] = 1
      if (ENVIRON["ADDR"] != "" && index($0, "ray.util.client.server") > 0 &&
          index($0, "--address=" ENVIRON["ADDR"] " ") > 0) keep[$1] = 1 }
    END {
      do { grew = 0
           for (i = 1; i <= NR; i++)
             if (!(pid[i] in keep) && (ppid[i] in keep)) { keep[pid[i]] = 1; grew = 1 }
      } while (grew)
      for (p in keep) print p
    }'
}

# Those of the given pids still running; zombies count as gone (an orphan's zombie may
# linger where PID 1 does not reap).
running() { ps -o pid=,stat= -p "${1// /,}" 2>/dev/null | awk '$2 !~ /^Z/ { print $1 }' || true; }

pids=$(cluster_pids | grep -vx "$$" | tr "\n" " " || true)
pids="${pids% }"
if [[ -z "$pids" ]]; then
  echo "stop-local.sh: no processes under $RAY_LOCAL_DIR" >&2
else
  echo "stop-local.sh: stopping $(echo $pids | wc -w) processes under $RAY_LOCAL_DIR" >&2
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 50); do
    alive="$(running "$pids" | tr "\n" " ")"
    [[ -z "${alive// /}" ]] && break
    sleep 0.1
  done
  if [[ -n "${alive// /}" ]]; then kill -KILL $alive 2>/dev/null || true; fi
fi
if [[ -n "$NODE" ]]; then
  rm -f "$RAY_LOCAL_DIR/node-$NODE.pids"
else
  rm -f "$RAY_LOCAL_DIR/ray/ray_current_cluster" "$RAY_LOCAL_DIR/address" \
        "$RAY_LOCAL_DIR/auth_token" \
        "$RAY_LOCAL_DIR"/node-*.pids
fi
