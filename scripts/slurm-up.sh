#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for tests and CI: installs slurm-wlm and munge if
# missing (Debian, as root), writes a config for this host, starts munged, slurmctld and slurmd,
# and waits until `sinfo` shows the node idle. Two partitions on that node: debug (the default, no
# time limit) and short (MaxTime=10 minutes). Idempotent: a running, healthy cluster is left as is.
# `scripts/slurm-up.sh down` stops the daemons.
set -euo pipefail

STATE=${SODA_SLURM_STATE:-/tmp/soda-slurm}
CONF_DIR=/etc/slurm
HOST=$(hostname -s)

log() { echo "slurm-up: $*"; }

down() {
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    # Wait until they are gone: a restart that found the old daemon still exiting would not start a new one.
    for _ in $(seq 60); do pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || break; sleep 0.5; done
    log "stopped slurmctld and slurmd"
}

if [ "${1:-up}" = "down" ]; then down; exit 0; fi

if [ "$(id -u)" -ne 0 ]; then
    echo "slurm-up: needs root (apt-get install and the daemons); run it with sudo" >&2
    exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    log "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# munge: a key owned by munge, mode 0400, and a running daemon.
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
[ -s /etc/munge/munge.key ] || mungekey -c -f -k /etc/munge/munge.key
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0400 /etc/munge/munge.key
chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    su -s /bin/sh munge -c munged
    for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
fi
munge -n | unmunge >/dev/null || { echo "slurm-up: munge does not work (see /var/log/munge)" >&2; exit 1; }

# slurm.conf for one node with this machine's CPUs and most of its memory.
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
mkdir -p "$STATE"/{spool,state,log} "$CONF_DIR"
CONF=$(cat <<CONF
# Written by scripts/slurm-up.sh: a single-node cluster for the project's tests.
ClusterName=soda
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
# Refuse at submission (and in sbatch --test-only) a job above its partition's limits (MaxTime,
# MaxNodes), which SLURM would otherwise accept and leave pending forever.
EnforcePartLimits=ALL
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmdSpoolDir=$STATE/spool
StateSaveLocation=$STATE/state
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=10
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
# A partition with a time limit, for the tests of jobs that ask for more (the same node).
PartitionName=short Nodes=$HOST MaxTime=10 State=UP
CONF
)
if [ "$(cat "$CONF_DIR/slurm.conf" 2>/dev/null)" != "$CONF" ]; then
    printf '%s\n' "$CONF" > "$CONF_DIR/slurm.conf"
    down  # a changed config needs fresh daemons
fi

pgrep -x slurmctld >/dev/null || slurmctld
for _ in $(seq 30); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.5; done
pgrep -x slurmd >/dev/null || slurmd

for _ in $(seq 60); do
    state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -1) || true  # the controller may not answer yet
    case "$state" in
        idle|mixed|allocated) log "node $HOST is $state"; sinfo; exit 0 ;;
        down*|drain*) scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
    esac
    sleep 1
done
echo "slurm-up: node $HOST did not become idle (state: ${state:-unknown}); see $STATE/log/" >&2
exit 1
