#!/usr/bin/env bash
# A local multi-process Ray cluster on this machine, to try the whole `ray job submit` path
# (working_dir upload, runtime_env, a job driver on the head, Train workers on another node,
# checkpoints to object storage) before going to KubeRay or the cluster launcher.
#
#   scripts/local_cluster.sh start    # a head node + SPEED_RAY_WORKERS worker node processes
#   eval "$(scripts/local_cluster.sh env)"
#   ray job submit --runtime-env cluster/runtime_env.yaml -- \
#       python -m ray_jobs.train train.steps=20 run.output_uri="$PWD/outputs"   # or s3://bucket/prefix
#   scripts/local_cluster.sh status   # nodes and resources (exit 3 when not running)
#   scripts/local_cluster.sh stop     # stops THIS cluster only
#
# Settings (environment):
#   SPEED_RAY_DIR             state + Ray temp dir (default /tmp/speed-ray-$UID; keep it short:
#                             Unix socket paths under it are limited to ~107 characters)
#   SPEED_RAY_PORT            GCS port of the head (default 6380)
#   SPEED_RAY_DASHBOARD_PORT  dashboard / job API port, bound to 127.0.0.1 (default 8266)
#   SPEED_RAY_WORKERS         worker node processes besides the head (default 1; 0 = head only)
#   SPEED_RAY_HEAD_CPUS       CPUs the head advertises (default 0 with workers, like the KubeRay
#                             head; all CPUs of the machine when SPEED_RAY_WORKERS=0)
#   SPEED_RAY_WORKER_CPUS     CPUs each worker node advertises (default 1)
#   SPEED_RAY_OBJECT_STORE_MB object store per node (default 256)
#   SPEED_RAY_AUTH            token (default) | disabled
#   SPEED_RAY_STOP_GRACE_S    seconds between SIGTERM and SIGKILL on stop (default 5)
#   RAY_BIN                   the ray CLI (default: .venv/bin/ray of this checkout, else `ray`)
#
# Safety: `ray stop` kills EVERY Ray process of the machine (other users' local Rays, a test
# session's Ray), so it is never used here. Every process of this cluster inherits the marker
# SPEED_RAY_CLUSTER_DIR=<dir> in its environment (raylets, GCS, dashboard, workers, job drivers);
# `stop` signals exactly the processes whose /proc/PID/environ carries it.
#
# Network: the dashboard and job API listen on 127.0.0.1 only. Ray's token authentication is on
# (RAY_AUTH_MODE=token, a random token in $SPEED_RAY_DIR/auth_token, mode 600). On Linux Ray replaces
# a loopback --node-ip-address by the machine's routable IP, so with worker nodes the GCS, raylet and
# object-manager gRPC ports listen on that IP (token-protected); SPEED_RAY_WORKERS=0 keeps the node
# IP at 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) and every port on loopback.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${SPEED_RAY_DIR:-/tmp/speed-ray-$(id -u)}"
PORT="${SPEED_RAY_PORT:-6380}"
DASHBOARD_PORT="${SPEED_RAY_DASHBOARD_PORT:-8266}"
WORKERS="${SPEED_RAY_WORKERS:-1}"
WORKER_CPUS="${SPEED_RAY_WORKER_CPUS:-1}"
OBJECT_STORE_MB="${SPEED_RAY_OBJECT_STORE_MB:-256}"
AUTH="${SPEED_RAY_AUTH:-token}"
GRACE="${SPEED_RAY_STOP_GRACE_S:-5}"
if [[ -z "${RAY_BIN:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/ray" ]]; then RAY_BIN="$ROOT/.venv/bin/ray"; else RAY_BIN="$(command -v ray || true)"; fi
fi
if [[ -z "${SPEED_RAY_HEAD_CPUS:-}" ]]; then
    if [[ "$WORKERS" -gt 0 ]]; then HEAD_CPUS=0; else HEAD_CPUS="$(nproc)"; fi
else
    HEAD_CPUS="$SPEED_RAY_HEAD_CPUS"
fi

# setsid: the cluster survives the terminal (and its Ctrl-C) that started it.
SETSID=(); command -v setsid > /dev/null && SETSID=(setsid)

STATE="$DIR/cluster.env"
TOKEN_FILE="$DIR/auth_token"
TEMP_DIR="$DIR/ray"
LOG="$DIR/start.log"

die() { echo "local_cluster: $*" >&2; exit 1; }

# PIDs of every live process that carries this cluster's marker (never this script itself). One
# grep reads every /proc/PID/environ; a zombie's is empty, so the dead are never listed.
cluster_pids() {
    local file pid
    for file in $(grep -lzxF -- "SPEED_RAY_CLUSTER_DIR=$DIR" /proc/[0-9]*/environ 2>/dev/null); do
        pid="${file#/proc/}"; pid="${pid%/environ}"
        [[ "$pid" == "$$" || "$pid" == "${BASHPID:-$$}" ]] || echo "$pid"
    done
}

# Environment of a client of this cluster (ray job submit / ray status / a local driver).
client_env() {
    # shellcheck disable=SC1090
    . "$STATE"
    echo "export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT"
    echo "export SPEED_RAY_GCS_ADDRESS=$GCS_ADDRESS"
    # A loopback GCS address (head-only cluster) is rewritten to the routable IP by Ray clients
    # (ray status, ray.init(address=...)) unless this is 0.
    [[ "$GCS_ADDRESS" != 127.* ]] || echo "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
    if [[ "$AUTH" == token ]]; then
        echo "export RAY_AUTH_MODE=token"
        echo "export RAY_AUTH_TOKEN_PATH=$TOKEN_FILE"
    else
        echo "export RAY_AUTH_MODE=disabled"
    fi
}

free_ports() {  # N distinct free TCP ports on 127.0.0.1
    "$PYTHON" - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

wait_http() {  # wait until the job API answers (any HTTP status counts as up)
    "$PYTHON" - "$1" "$2" <<'EOF'
import sys, time, urllib.request, urllib.error
url, deadline = sys.argv[1], time.time() + float(sys.argv[2])
while True:
    try:
        urllib.request.urlopen(url, timeout=2); sys.exit(0)
    except urllib.error.HTTPError:
        sys.exit(0)
    except Exception:
        if time.time() > deadline:
            sys.exit(1)
        time.sleep(0.5)
EOF
}

start() {
    [[ -n "$RAY_BIN" && -x "$RAY_BIN" ]] || die "no ray CLI found; set RAY_BIN or create .venv"
    PYTHON="$(dirname "$RAY_BIN")/python"; [[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"
    if [[ -n "$(cluster_pids)" ]]; then die "a cluster is already running in $DIR; run: $0 stop"; fi
    umask 077
    mkdir -p "$DIR" "$TEMP_DIR"
    : > "$LOG"
    local ports; read -r -a ports <<< "$(free_ports $((5 + 4 * WORKERS)))"
    # Every process below inherits this environment (and the marker that `stop` looks for).
    export SPEED_RAY_CLUSTER_DIR="$DIR"
    export PATH="$(dirname "$RAY_BIN"):$PATH"   # `python` in job entrypoints = this interpreter
    export RAY_USAGE_STATS_ENABLED=0
    unset RAY_ADDRESS RAY_API_SERVER_ADDRESS
    if [[ "$AUTH" == token ]]; then
        "$PYTHON" -c 'import secrets; print(secrets.token_hex(32))' > "$TOKEN_FILE"
        chmod 600 "$TOKEN_FILE"
        export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN_FILE"
        unset RAY_AUTH_TOKEN
    else
        export RAY_AUTH_MODE=disabled
    fi
    local common=(--temp-dir="$TEMP_DIR" --object-store-memory=$((OBJECT_STORE_MB * 1024 * 1024)) --disable-usage-stats)
    local loopback_only=1; [[ "$WORKERS" -gt 0 ]] && loopback_only=0
    echo "starting head: GCS port $PORT, dashboard http://127.0.0.1:$DASHBOARD_PORT, $HEAD_CPUS CPUs" >&2
    if ! RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=$((1 - loopback_only)) "${SETSID[@]}" "$RAY_BIN" start --head \
            --node-ip-address=127.0.0.1 --port="$PORT" \
            --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
            --num-cpus="$HEAD_CPUS" --num-gpus=0 \
            --ray-client-server-port="${ports[0]}" --dashboard-agent-listen-port="${ports[1]}" \
            --dashboard-agent-grpc-port="${ports[2]}" --runtime-env-agent-port="${ports[3]}" \
            --metrics-export-port="${ports[4]}" "${common[@]}" >> "$LOG" 2>&1 < /dev/null; then
        tail -n 30 "$LOG" >&2; stop_quietly; die "the head did not start (log: $LOG)"
    fi
    local gcs; gcs="$(cat "$TEMP_DIR/ray_current_cluster")"
    printf 'GCS_ADDRESS=%q\nDASHBOARD_PORT=%q\nAUTH=%q\nWORKERS=%q\n' "$gcs" "$DASHBOARD_PORT" "$AUTH" "$WORKERS" > "$STATE"
    local i p
    for ((i = 0; i < WORKERS; i++)); do
        p=$((5 + 4 * i))
        echo "starting worker node $((i + 1))/$WORKERS: $WORKER_CPUS CPUs" >&2
        # --address 127.0.0.1:PORT: Ray resolves it to the head's node IP on Linux.
        if ! "${SETSID[@]}" "$RAY_BIN" start --address="127.0.0.1:$PORT" --num-cpus="$WORKER_CPUS" --num-gpus=0 \
                --dashboard-agent-listen-port="${ports[p]}" --dashboard-agent-grpc-port="${ports[p + 1]}" \
                --runtime-env-agent-port="${ports[p + 2]}" --metrics-export-port="${ports[p + 3]}" \
                "${common[@]}" >> "$LOG" 2>&1 < /dev/null; then
            tail -n 30 "$LOG" >&2; stop_quietly; die "worker node $((i + 1)) did not start (log: $LOG)"
        fi
    done
    wait_http "http://127.0.0.1:$DASHBOARD_PORT/api/version" 60 || { stop_quietly; die "the job API did not come up"; }
    echo "local Ray cluster up: GCS $gcs, job API http://127.0.0.1:$DASHBOARD_PORT, logs $TEMP_DIR/session_latest/logs" >&2
    echo "# to use it:  eval \"\$($0 env)\"" >&2
    client_env
}

stop_quietly() { stop > /dev/null 2>&1 || true; }

stop() {
    local pids; pids="$(cluster_pids)"
    if [[ -z "$pids" ]]; then
        echo "local_cluster: nothing running in $DIR" >&2
    else
        echo "stopping $(echo "$pids" | wc -w) processes of the cluster in $DIR" >&2
        # shellcheck disable=SC2086
        kill -TERM $pids 2>/dev/null || true
        local deadline=$((SECONDS + GRACE))
        while [[ -n "$(cluster_pids)" && $SECONDS -lt $deadline ]]; do sleep 0.5; done
        pids="$(cluster_pids)"
        # shellcheck disable=SC2086
        [[ -z "$pids" ]] || kill -KILL $pids 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$STATE" "$TOKEN_FILE"
    [[ -z "$(cluster_pids)" ]] || die "some processes survived: $(cluster_pids | tr '\n' ' ')"
}

status() {
    local pids; pids="$(cluster_pids)"
    if [[ ! -f "$STATE" || -z "$pids" ]]; then
        echo "local_cluster: not running (dir $DIR)" >&2
        exit 3
    fi
    # shellcheck disable=SC1090
    . "$STATE"
    echo "local Ray cluster in $DIR: $(echo "$pids" | wc -w) processes, GCS $GCS_ADDRESS, job API http://127.0.0.1:$DASHBOARD_PORT"
    eval "$(client_env)"
    "$RAY_BIN" status --address="$GCS_ADDRESS"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) [[ -f "$STATE" ]] || die "not running (no $STATE)"; client_env ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
