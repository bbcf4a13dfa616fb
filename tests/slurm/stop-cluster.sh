#!/usr/bin/env bash
# Stop the test cluster started by start-cluster.sh, using only the PIDs it
# recorded in STATE_DIR/pids (never pkill/killall by name).
#
# Usage: stop-cluster.sh STATE_DIR
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 STATE_DIR" >&2
    exit 2
fi

STATE_DIR=$1
PIDS="$STATE_DIR/pids"
GRACE=${SLURM_TEST_STOP_GRACE:-10}

if [[ ! -f "$PIDS" ]]; then
    echo "[stop-cluster] no pid file at $PIDS; nothing to stop" >&2
    exit 0
fi

# The pid file records "name pid" lines in start order (munged, slurmctld,
# slurmd); stop in reverse order so munged goes last.
mapfile -t lines < <(tac "$PIDS")

is_ours() {
    # guard against PID reuse: the process must still be the named daemon
    local name=$1 pid=$2 comm
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ "$comm" == "$name"* ]]
}

# Cancel this cluster's jobs first so no slurmstepd/job processes outlive slurmd.
ctld_pid=$(awk '$1 == "slurmctld" {print $2}' "$PIDS")
if [[ -f "$STATE_DIR/slurm.conf" && -n "$ctld_pid" ]] && is_ours slurmctld "$ctld_pid"; then
    export SLURM_CONF="$STATE_DIR/slurm.conf"
    jobs=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
    if [[ -n "$jobs" ]]; then
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null || true
        for _ in $(seq 1 25); do
            [[ -z "$(timeout 5 squeue -h -t R,CG,PD -o %i 2>/dev/null || true)" ]] && break
            sleep 0.2
        done
    fi
fi

for line in "${lines[@]}"; do
    read -r name pid <<<"$line"
    [[ -n "${pid:-}" ]] || continue
    if is_ours "$name" "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
    fi
done

deadline=$((SECONDS + GRACE))
for line in "${lines[@]}"; do
    read -r name pid <<<"$line"
    [[ -n "${pid:-}" ]] || continue
    while is_ours "$name" "$pid" && [[ $SECONDS -lt $deadline ]]; do
        sleep 0.2
    done
    if is_ours "$name" "$pid"; then
        echo "[stop-cluster] $name ($pid) ignored TERM, sending KILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
done

rm -f "$PIDS"
echo "[stop-cluster] stopped" >&2
