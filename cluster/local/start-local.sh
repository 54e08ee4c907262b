#!/usr/bin/env bash
# Start a local multi-node Ray cluster: one head and N worker raylets on this machine,
# each a real `ray start` process with its own loopback address (127.0.0.2, .3, ...).
#
#   cluster/local/start-local.sh [WORKERS]        # default 2 workers (3 nodes in all)
#   eval "$(cluster/local/start-local.sh 2)"      # or run it and copy the export lines it prints
#   python my_driver.py                     # ray.init() / memstore.connect() join the cluster
#   cluster/local/stop-local.sh
#
# stdout is exactly three lines (progress and Ray's own output go to stderr):
#   export RAY_ADDRESS=127.0.0.2:6379
#   export RAY_AUTH_MODE=token
#   export RAY_AUTH_TOKEN_PATH=/tmp/ray-local-6379/auth_token
#
# Environment (all optional):
#   RAY_PORT        GCS port of the head (default 6379)
#   HEAD_IP         head address (default 127.0.0.2); worker i gets HEAD_IP's last octet + i
#   HEAD_CPUS       CPUs the head offers to tasks (default 1)
#   WORKER_CPUS     CPUs each worker offers (default 2)
#   OBJECT_STORE_MB object store per node in MiB (default 256)
#   HEAD_SYSTEM_CONFIG  JSON of Ray system settings for the head, which the GCS applies
#                   to the whole cluster (e.g. faster node health checks in tests)
#   RAY             the ray CLI (default: `ray` on PATH, else .venv/bin/ray of this repo)
#   RAY_LOCAL_DIR   this cluster's private directory (default /tmp/ray-local-$RAY_PORT):
#                   its token, and Ray's temp dir with the logs in $RAY_LOCAL_DIR/ray;
#                   stop-local.sh finds this cluster's processes by it
#   DASHBOARD_PORT  start Ray's dashboard (and job API) on HEAD_IP:DASHBOARD_PORT, a
#                   loopback address (default: no dashboard)
#
# Ray runs with token authentication: every raylet, driver, the dashboard and the job API
# need the token in $RAY_LOCAL_DIR/auth_token. RAY_LOCAL_DIR is private to you: created
# with mode 0700, or, when it exists, used only if it is a directory (not a link) that
# you own and that nobody else can write to. An auth_token already there is used only if
# it is a regular file (not a link) that you own and that nobody else can read or write;
# otherwise the script refuses to start, since another user of this machine (/tmp is
# shared) could have planted it and would then hold the cluster's token.
#
# Each node's own processes (raylet, log monitor) are recorded by pid in
# $RAY_LOCAL_DIR/node-<ip>.pids, so that `stop-local.sh --node <ip>` stops that node
# alone, as a lost machine would leave the cluster.
#
# Addresses 127.0.0.2-127.0.0.254 all route to the loopback interface on Linux. Ray
# rewrites 127.0.0.1 (and localhost) to the machine's interface address, but keeps these,
# so every raylet, object manager and GCS connection stays on loopback.
set -Eeuo pipefail

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0   # Ray picks loopback, never the interface IP
export RAY_USAGE_STATS_ENABLED=0             # no usage report leaves the machine

WORKERS="${1:-2}"
RAY_PORT="${RAY_PORT:-6379}"
HEAD_IP="${HEAD_IP:-127.0.0.2}"
HEAD_CPUS="${HEAD_CPUS:-1}"
WORKER_CPUS="${WORKER_CPUS:-2}"
OBJECT_STORE_MB="${OBJECT_STORE_MB:-256}"
RAY_LOCAL_DIR="${RAY_LOCAL_DIR:-/tmp/ray-local-$RAY_PORT}"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -z "${RAY:-}" ]]; then
  if command -v ray >/dev/null 2>&1; then RAY="$(command -v ray)"
  elif [[ -x "$here/../../.venv/bin/ray" ]]; then RAY="$here/../../.venv/bin/ray"
  else echo "start-local.sh: no ray CLI (install ray or set RAY=/path/to/ray)" >&2; exit 2
  fi
fi
# The Python that runs the CLI (for joining workers, below).
PYTHON="$(head -n1 "$RAY" | sed -n 's/^#!//p')"

if ! [[ "$WORKERS" =~ ^[0-9]+$ ]]; then
  echo "start-local.sh: WORKERS must be a number, got '$WORKERS'" >&2; exit 2
fi
if ! [[ "$HEAD_IP" =~ ^127\.0\.0\.([0-9]+)$ ]] || (( BASH_REMATCH[1] < 2 )); then
  echo "start-local.sh: HEAD_IP must be 127.0.0.N with N >= 2 (got $HEAD_IP)" >&2; exit 2
fi
first="${BASH_REMATCH[1]}"
if (( first + WORKERS > 254 )); then
  echo "start-local.sh: too many workers for 127.0.0.$first..254" >&2; exit 2
fi

if [[ -n "${DASHBOARD_PORT:-}" ]] && ! [[ "$DASHBOARD_PORT" =~ ^[0-9]+$ ]]; then
  echo "start-local.sh: DASHBOARD_PORT must be a port number, got '$DASHBOARD_PORT'" >&2; exit 2
fi

refuse() { echo "start-local.sh: $*; refusing to start" >&2; exit 2; }

# "<owner uid> <octal mode>" of a path (Linux stat).
owner_mode() { stat -c '%u %a' -- "$1"; }

# The cluster's directory: created private, or an existing one that only you control.
private_dir() {
  local dir="$1" uid mode
  if [[ ! -e "$dir" && ! -L "$dir" ]]; then
    mkdir -m 700 -- "$dir" 2>/dev/null || [[ -d "$dir" ]] || refuse "cannot create $dir"
  fi
  [[ -L "$dir" ]] && refuse "$dir is a symbolic link"
  [[ -d "$dir" ]] || refuse "$dir is not a directory"
  read -r uid mode < <(owner_mode "$dir")
  (( uid == $(id -u) )) || refuse "$dir is owned by uid $uid, not by you (uid $(id -u))"
  (( (8#$mode & 8#022) == 0 )) || refuse "$dir (mode $mode) is writable by other users"
  chmod 700 -- "$dir"
}

# The cluster's token: a fresh one, or an existing file that only you can read.
private_token() {
  local path="$1" uid mode
  if [[ ! -e "$path" && ! -L "$path" ]]; then
    # noclobber: a file that appears meanwhile is never written through.
    (umask 077; set -o noclobber
     "$PYTHON" -c 'import secrets; print(secrets.token_hex(32), end="")' > "$path") ||
      refuse "cannot create the token file $path"
  fi
  [[ -L "$path" ]] && refuse "the token file $path is a symbolic link"
  [[ -f "$path" ]] || refuse "the token file $path is not a regular file"
  read -r uid mode < <(owner_mode "$path")
  (( uid == $(id -u) )) ||
    refuse "the token file $path is owned by uid $uid, not by you (uid $(id -u)): another" \
           "user may know it; remove it or choose another RAY_LOCAL_DIR"
  (( (8#$mode & 8#077) == 0 )) ||
    refuse "the token file $path (mode $mode) is open to other users; remove it or chmod 600"
  [[ -s "$path" ]] || refuse "the token file $path is empty"
}

store=$((OBJECT_STORE_MB * 1024 * 1024))
private_dir "$RAY_LOCAL_DIR"
# Ray makes its temp dir writable by everyone (mode 0777); inside the private directory
# nobody else can reach it.
common=(--object-store-memory="$store" --disable-usage-stats --temp-dir="$RAY_LOCAL_DIR/ray")

# Token authentication with a token of this cluster's own. Left unset, `ray start --head`
# turns token auth on when ~/.ray/auth_token exists while `ray start --address` does not,
# and the workers cannot join; explicit settings make every node and driver agree.
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="$RAY_LOCAL_DIR/auth_token"
unset RAY_AUTH_TOKEN  # it would take precedence over the file
private_token "$RAY_AUTH_TOKEN_PATH"

# stop-local.sh finds the head's Ray client server by this address.
echo "$HEAD_IP:$RAY_PORT" > "$RAY_LOCAL_DIR/address"

# Whatever fails below, leave no half-started cluster behind.
trap 'echo "start-local.sh: failed; stopping what was started" >&2
      RAY_LOCAL_DIR="$RAY_LOCAL_DIR" "$here/stop-local.sh" >&2 || true' ERR

# The processes of the node at $1 (a raylet or log monitor naming that address and this
# cluster's temp dir), one pid a line. The trailing space keeps 127.0.0.2 from matching
# 127.0.0.21.
node_pids() {
  ps -eo pid=,args= | DIR="$RAY_LOCAL_DIR/" IP="$1" awk '
    { line = $0 " " }
    index(line, ENVIRON["DIR"]) > 0 &&
    (index(line, "--node_ip_address=" ENVIRON["IP"] " ") > 0 ||
     index(line, "--node-ip-address=" ENVIRON["IP"] " ") > 0) &&
    (index(line, "/raylet ") > 0 || index(line, "log_monitor.py") > 0) { print $1 }'
}

head_extra=(--include-dashboard=false)
[[ -n "${DASHBOARD_PORT:-}" ]] && head_extra=(--include-dashboard=true
  --dashboard-host="$HEAD_IP" --dashboard-port="$DASHBOARD_PORT")
[[ -n "${HEAD_SYSTEM_CONFIG:-}" ]] && head_extra+=(--system-config="$HEAD_SYSTEM_CONFIG")

echo "starting head on $HEAD_IP:$RAY_PORT ($HEAD_CPUS CPU)" >&2
"$RAY" start --head --node-ip-address="$HEAD_IP" --port="$RAY_PORT" \
  --num-cpus="$HEAD_CPUS" "${head_extra[@]}" "${common[@]}" >&2
node_pids "$HEAD_IP" > "$RAY_LOCAL_DIR/node-$HEAD_IP.pids"

# `ray start --address` refuses to join a worker while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0.
# Lift that one check inside the CLI process only; the raylets it spawns keep the
# variable at 0, and the explicit --node-ip-address keeps them on loopback.
join() {
  "$PYTHON" -c '
import sys
import ray._private.ray_constants as c
c.ENABLE_RAY_CLUSTER = True
from ray.scripts.scripts import main
sys.argv[0] = "ray"
sys.exit(main())
' "$@"
}

for ((i = 1; i <= WORKERS; i++)); do
  ip="127.0.0.$((first + i))"
  echo "starting worker $i on $ip ($WORKER_CPUS CPU)" >&2
  join start --address="$HEAD_IP:$RAY_PORT" --node-ip-address="$ip" \
    --num-cpus="$WORKER_CPUS" "${common[@]}" >&2
  node_pids "$ip" > "$RAY_LOCAL_DIR/node-$ip.pids"
done

trap - ERR
echo "cluster up: head $HEAD_IP:$RAY_PORT + $WORKERS worker(s), logs in $RAY_LOCAL_DIR;" \
  "stop with: RAY_PORT=$RAY_PORT cluster/local/stop-local.sh" >&2
echo "export RAY_ADDRESS=$HEAD_IP:$RAY_PORT"
echo "export RAY_AUTH_MODE=token"
echo "export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
