#!/usr/bin/env bash
# The SLURM test cluster on this machine, for tests and CI: installs slurm-wlm and munge if missing
# (Debian, as root), writes a config, starts munged, slurmctld and the slurmds, and waits until
# `sinfo` shows every node idle. Idempotent: a running, healthy cluster is left as is.
#
# - Node $(hostname -s), this machine itself, in partitions debug (the default, no time limit) and
#   short (MaxTime=10 minutes).
# - NODES (default 3) compute nodes soda-n1..soda-nN in partition multi, for multi-node jobs. Each
#   is a slurmd in a network namespace of its own, with its own host name (a UTS namespace) and
#   address 10.29.0.1N on a bridge (sodabr0, 10.29.0.1), so that the ranks of a job on two nodes
#   talk over that network, not loopback; the file system is shared, as on a cluster. NODES=0: the
#   single node only.
#
# `scripts/slurm-up.sh down` stops the daemons and removes the nodes' namespaces and bridge;
# `kill-node soda-n2` loses that node as a machine is lost (its link cut, its processes killed),
# `start-node soda-n2` brings it back (SLURM returns it to service when its slurmd registers).
set -euo pipefail

STATE=${SODA_SLURM_STATE:-/tmp/soda-slurm}
CONF_DIR=/etc/slurm
HOST=$(hostname -s)
NODES=${NODES:-3}
NET=10.29.0  # the nodes' subnet: the bridge is .1, node i is .1i
BRIDGE=sodabr0

log() { echo "slurm-up: $*"; }
node_name() { echo "soda-n$1"; }
node_addr() { echo "$NET.$((10 + $1))"; }

stop_daemons() {
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    # Wait until they are gone: a restart that found the old daemon still exiting would not start a new one.
    for _ in $(seq 60); do pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || break; sleep 0.5; done
    log "stopped slurmctld and the slurmds"
}

# The compute nodes' namespaces there are now, by name.
present_nodes() { ip netns list 2>/dev/null | awk '/^soda-n[0-9]+/ {print $1}'; }

# A node's processes, namespace and hosts file.
remove_node() {
    ip netns pids "$1" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$1" 2>/dev/null || true
    rm -rf "/etc/netns/$1"
}

if [ "${1:-up}" = "down" ]; then
    stop_daemons
    for ns in $(present_nodes); do remove_node "$ns"; done
    ip link del "$BRIDGE" 2>/dev/null || true
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "slurm-up: needs root (apt-get install, network namespaces and the daemons); run it with sudo" >&2
    exit 1
fi
case "$NODES" in ''|*[!0-9]*) echo "slurm-up: NODES=$NODES is not a number of nodes (0 to 9)" >&2; exit 1 ;; esac
if [ "$NODES" -gt 9 ]; then echo "slurm-up: NODES=$NODES: at most 9 compute nodes" >&2; exit 1; fi

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

# The compute nodes' network: a bridge, and per node a namespace joined to it by a veth pair, its
# host names in /etc/netns/<node>/hosts (its /etc/hosts: start_node).
node_network() {
    local i=$1 ns addr
    ns=$(node_name "$i"); addr=$(node_addr "$i")
    ip netns list | grep -qw "^$ns" || ip netns add "$ns"
    if ! ip link show "veth-$ns" >/dev/null 2>&1; then
        ip link add "veth-$ns" type veth peer name eth0 netns "$ns"
        ip netns exec "$ns" ip addr add "$addr/24" dev eth0
    fi
    ip link set "veth-$ns" master "$BRIDGE" up
    ip netns exec "$ns" ip link set lo up
    ip netns exec "$ns" ip link set eth0 up
    mkdir -p "/etc/netns/$ns"
    { echo "127.0.0.1 localhost"; echo "$NET.1 $HOST"
      for j in $(seq "$NODES"); do echo "$(node_addr "$j") $(node_name "$j")"; done; } > "/etc/netns/$ns/hosts"
}

# A node's slurmd in its network namespace, under its own host name (a UTS namespace) and with the
# nodes' /etc/hosts (a mount namespace; `ip netns exec` would also hide /sys/fs/cgroup, which
# slurmd needs). What it starts (the job's steps and ranks) inherits all three.
start_node() {
    local ns=$1
    ip link set "veth-$ns" up
    mkdir -p "$STATE/spool/$ns"
    pgrep -f "^slurmd -N $ns\$" >/dev/null ||
        nsenter --net="/run/netns/$ns" unshare --uts --mount sh -c \
            "mount --bind /etc/netns/$ns/hosts /etc/hosts && hostname $ns && exec slurmd -N $ns"
}

# A node lost the way a machine is lost: its link cut first, so that its peers see silence, not a
# closed connection, then every process in it killed (slurmd, the job's steps and ranks).
kill_node() {
    local ns=$1
    ip link set "veth-$ns" down
    ip netns pids "$ns" | xargs -r kill -9
    log "node $ns is cut off and its processes are killed"
}

case "${1:-up}" in
    kill-node) kill_node "$2"; exit 0 ;;
    start-node) start_node "$2"; log "started slurmd on node $2"; exit 0 ;;
    up) ;;
    *) echo "usage: slurm-up.sh [up|down|kill-node NODE|start-node NODE]" >&2; exit 1 ;;
esac

# slurm.conf: this machine's node with its CPUs and most of its memory, and the compute nodes
# with the same (they share them: a test cluster, not a capacity).
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
CONTROLLER=$HOST
COMPUTE=""
if [ "$NODES" -gt 0 ]; then
    ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
    ip addr show "$BRIDGE" | grep -q "inet $NET.1/" || ip addr add "$NET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for i in $(seq "$NODES"); do node_network "$i"; done
    CONTROLLER="$HOST($NET.1)"  # the address the nodes reach the controller at
    COMPUTE=$(for i in $(seq "$NODES"); do
        echo "NodeName=$(node_name "$i") NodeAddr=$(node_addr "$i") CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN"
    done; echo "# Multi-node jobs: the compute nodes, each in a network namespace of its own."
    echo "PartitionName=multi Nodes=soda-n[1-$NODES] MaxTime=INFINITE State=UP")
fi
# Namespaces of a cluster with more nodes than this one asks for go.
for ns in $(present_nodes); do [ "${ns#soda-n}" -le "$NODES" ] || remove_node "$ns"; done
[ "$NODES" -gt 0 ] || ip link del "$BRIDGE" 2>/dev/null || true

mkdir -p "$STATE"/{spool,state,log} "$CONF_DIR"
CONF=$(cat <<CONF
# Written by scripts/slurm-up.sh: the project's test cluster ($NODES compute nodes besides $HOST).
ClusterName=soda
SlurmctldHost=$CONTROLLER
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
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmdSpoolDir=$STATE/spool/%n
StateSaveLocation=$STATE/state
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmctldTimeout=30
# A node that does not answer for this long is DOWN, and its jobs are requeued (or end NODE_FAIL).
SlurmdTimeout=30
KillWait=10
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
# A partition with a time limit, for the tests of jobs that ask for more (the same node).
PartitionName=short Nodes=$HOST MaxTime=10 State=UP
$COMPUTE
CONF
)
if [ "$(cat "$CONF_DIR/slurm.conf" 2>/dev/null)" != "$CONF" ]; then
    printf '%s\n' "$CONF" > "$CONF_DIR/slurm.conf"
    stop_daemons  # a changed config needs fresh daemons
fi

pgrep -x slurmctld >/dev/null || slurmctld
for _ in $(seq 30); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.5; done
pgrep -f "^slurmd\$" >/dev/null || slurmd
for i in $(seq "$NODES"); do start_node "$(node_name "$i")"; done

ALL=$HOST
[ "$NODES" -eq 0 ] || ALL="$HOST,soda-n[1-$NODES]"
for _ in $(seq 60); do
    states=$(sinfo -h -N -n "$ALL" -o "%N %T" 2>/dev/null | sort -u) || true  # the controller may not answer yet
    waiting=$(echo "$states" | awk '$2 !~ /^(idle|mixed|allocated)$/' | wc -l)
    [ -n "$states" ] && [ "$waiting" -eq 0 ] && { log "$(echo "$states" | wc -l) nodes up"; sinfo; exit 0; }
    echo "$states" | awk '$2 ~ /^(down|drain)/ {print $1}' |
        xargs -r -I{} scontrol update nodename={} state=resume 2>/dev/null || true
    sleep 1
done
echo "slurm-up: not every node became idle:" $states "; see $STATE/log/" >&2
exit 1
