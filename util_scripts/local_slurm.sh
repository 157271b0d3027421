#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (munged, slurmctld, slurmd started from the command line, no
# systemd), for trying training_scripts/ locally and for tests/test_slurm.py. Run as root.
#
#   sudo bash util_scripts/local_slurm.sh start    # install if missing, configure, start, check; idempotent
#   sudo bash util_scripts/local_slurm.sh status   # what runs; exit 0 only when a node accepts jobs
#   sudo bash util_scripts/local_slurm.sh stop     # stop the daemons THIS script started (never others)
#
# start exits non-zero, naming the step, when the cluster does not come up. Daemons already running
# (started by hand, by systemd or by another state directory) are used and never stopped.
#
# Settings (environment):
#   MIDTRAIN_SLURM_STATE   where the PIDs of the daemons this script started are kept (default /tmp/midtrain-slurm)
#   MIDTRAIN_SLURM_GPUS    gres/gpu count of the node (default 2): character devices without a GPU behind them,
#                          so --gpus-per-node=N and SLURM_GPUS_ON_NODE behave as on a GPU node; 0 = none
#   MIDTRAIN_SLURM_PARTITION   partition name (default debug)
# /etc/slurm/slurm.conf is written when missing or when this script wrote it (its first line says so);
# a slurm.conf written by anyone else is left alone.
set -euo pipefail

STATE="${MIDTRAIN_SLURM_STATE:-/tmp/midtrain-slurm}"
GPUS="${MIDTRAIN_SLURM_GPUS:-2}"
PARTITION="${MIDTRAIN_SLURM_PARTITION:-debug}"
CONF=/etc/slurm/slurm.conf
HEADER="# one-node test cluster written by midtrain util_scripts/local_slurm.sh"
DEVICES=/var/lib/midtrain-slurm  # the fake GPU device nodes
DAEMONS=(munged slurmctld slurmd)  # start order; stop goes backwards

say() { echo "[local_slurm] $*"; }
fail() { echo "[local_slurm] error: $*" >&2; exit 1; }

# ours NAME: the PID this script recorded for NAME, if that process still runs NAME
ours() {
    local pid
    pid="$(cat "$STATE/$1.pid" 2>/dev/null)" || return 1
    [[ -n "$pid" && -r /proc/$pid/cmdline ]] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q "$1" && echo "$pid"
}

node_state() { sinfo -h -N -o %T 2>/dev/null | head -n 1 | tr -d "*~#" || true; }

status() {
    local name pid ok=0
    for name in "${DAEMONS[@]}"; do
        if pid="$(ours "$name")"; then say "$name running, PID $pid (started by local_slurm.sh)"
        elif pid="$(pgrep -x "$name" | tr '\n' ' ')" && [[ -n "$pid" ]]; then say "$name running, PID(s) $pid (not started by local_slurm.sh)"
        else say "$name not running"; ok=1; fi
    done
    local node; node="$(node_state)"
    say "node: ${node:-none answers}"
    [[ "$node" == idle* || "$node" == mix* || "$node" == alloc* ]] || ok=1
    return "$ok"
}

stop() {
    local i name pid
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        name="${DAEMONS[i]}"
        pid="$(ours "$name")" || { rm -f "$STATE/$name.pid"; continue; }
        say "stopping $name (PID $pid)"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do [[ -d /proc/$pid ]] || break; sleep 0.2; done
        [[ -d /proc/$pid ]] && { say "$name did not stop in 10 s; killing it"; kill -9 "$pid" 2>/dev/null || true; }
        rm -f "$STATE/$name.pid"
    done
    say "stopped what this script started (state: $STATE)"
}

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return
    command -v apt-get >/dev/null || fail "slurmctld/slurmd/munged missing and no apt-get: install SLURM and munge"
    say "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -q slurm-wlm munge >/dev/null; } \
        || fail "apt-get install slurm-wlm munge failed"
}

setup_munge() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        say "creating /etc/munge/munge.key"
        mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
            || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
}

write_config() {
    install -d -o slurm -g slurm -m 0755 /var/spool/slurmctld /var/log/slurm
    install -d -m 0755 /var/spool/slurmd
    if [[ -f "$CONF" ]] && [[ "$(head -n 1 "$CONF")" != "$HEADER" ]]; then
        say "$CONF was not written by this script: using it as it is"; return
    fi
    local host mem gres="" types=""
    host="$(hostname -s)"
    mem="$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')"
    [[ -n "$mem" ]] || fail "slurmd -C reported no RealMemory"
    if (( GPUS > 0 )); then
        # slurmd ignores gres files that are not character devices: nodes with /dev/null's numbers
        mkdir -p "$DEVICES"
        for ((g = 0; g < GPUS; g++)); do [[ -c $DEVICES/gpu$g ]] || mknod "$DEVICES/gpu$g" c 1 3; done
        echo "NodeName=$host Name=gpu File=$DEVICES/gpu[0-$((GPUS - 1))]" > /etc/slurm/gres.conf
        gres="Gres=gpu:$GPUS"; types="GresTypes=gpu"
    else
        rm -f /etc/slurm/gres.conf
    fi
    # proctrack/linuxproc + task/none: no cgroups needed (containers); no accounting database
    cat > "$CONF" <<EOF
$HEADER
ClusterName=midtrain-local
SlurmctldHost=$host
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MinJobAge=3600
$types
NodeName=$host CPUs=$(nproc) RealMemory=$((mem * 9 / 10)) $gres State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    say "wrote $CONF (node $host, $(nproc) CPUs, $GPUS fake GPUs, partition $PARTITION)"
}

# launch NAME PIDFILE COMMAND...: start a daemon unless one runs; record its PID when this script started it
launch() {
    local name="$1" pidfile="$2" pid; shift 2
    if pid="$(ours "$name")"; then say "$name already running (PID $pid)"; return; fi
    if pid="$(pgrep -x "$name" | tr '\n' ' ')" && [[ -n "$pid" ]]; then
        say "$name already running (PID(s) $pid, not started by this script): using it"; return
    fi
    rm -f "$pidfile"
    "$@" || fail "$name did not start (exit $?); see its log under /var/log"
    for _ in $(seq 50); do [[ -s "$pidfile" ]] && break; sleep 0.2; done
    pid="$(cat "$pidfile" 2>/dev/null || pgrep -nx "$name" || true)"
    [[ -n "$pid" && -d /proc/$pid ]] || fail "$name exited after starting; see its log under /var/log"
    echo "$pid" > "$STATE/$name.pid"
    say "started $name (PID $pid)"
}

start() {
    [[ "$(id -u)" == 0 ]] || fail "run as root (sudo bash $0 start)"
    mkdir -p "$STATE"
    install_packages
    setup_munge
    write_config
    launch munged /run/munge/munged.pid runuser -u munge -- /usr/sbin/munged
    munge -n | unmunge >/dev/null || fail "munge cannot encode and decode a credential"
    launch slurmctld /run/slurmctld.pid /usr/sbin/slurmctld
    launch slurmd /run/slurmd.pid /usr/sbin/slurmd
    local node=""
    for _ in $(seq 60); do
        node="$(node_state)"
        [[ "$node" == down* || "$node" == drain* ]] && scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null
        [[ "$node" == idle* || "$node" == mix* || "$node" == alloc* ]] && break
        sleep 1
    done
    [[ "$node" == idle* || "$node" == mix* || "$node" == alloc* ]] \
        || fail "the node is '${node:-unknown}' after 60 s; see /var/log/slurm/slurmd.log and slurmctld.log"
    local ran
    ran="$(timeout 60 srun -N1 -n1 hostname 2>&1)" || fail "srun -N1 -n1 hostname failed: $ran"
    say "up: srun ran on $ran; stop with: sudo bash $0 stop"
}

case "${1:-}" in
    start) start ;;
    status) status ;;
    stop) stop ;;
    *) echo "usage: $0 start|status|stop" >&2; exit 2 ;;
esac
