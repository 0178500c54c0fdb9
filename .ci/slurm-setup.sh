#!/usr/bin/env bash
# A real single-node SLURM on this machine (slurmctld + slurmd + munge), for the launcher tests.
#
#   sudo bash .ci/slurm-setup.sh        # installs Debian's packages if needed, then starts
#
# Idempotent: when the controller answers and this node is idle or allocated, it does nothing.
# Follows notes/infra.md "SLURM, for real, on one machine": no accounting, proctrack/linuxproc,
# task/none (works in containers without cgroups), one partition with OverSubscribe so several
# test jobs share the node, ReturnToService=2 so a restarted slurmd brings the node back.
# Exit status 0 means `srun -N1 true` works. Needs root and apt (Debian/Ubuntu).
set -euo pipefail

log() { echo "[slurm-setup] $*" >&2; }

node="$(hostname -s)"
conf=/etc/slurm/slurm.conf

slurm_up() {
    command -v sinfo >/dev/null 2>&1 || return 1
    scontrol ping 2>/dev/null | grep -q "is UP" || return 1
    # The node must be usable, not merely known.
    local state
    state="$(sinfo -h -n "$node" -o %T 2>/dev/null | head -n1)"
    [[ "$state" =~ ^(idle|mixed|allocated|completing)$ ]]
}

if slurm_up; then
    log "SLURM already up on $node; nothing to do"
    exit 0
fi

if [[ $EUID -ne 0 ]]; then
    log "not root: cannot install or start SLURM (run as root, or start SLURM yourself)"
    exit 2
fi

# -- packages (about 7 s from Debian's mirror) ------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
    || ! command -v sbatch >/dev/null || ! command -v curl >/dev/null; then
    command -v apt-get >/dev/null || { log "apt-get not found: install slurmctld slurmd slurm-client munge yourself"; exit 2; }
    log "installing slurmctld slurmd slurm-client munge curl"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # curl: the job scripts poll the servers' /health with it.
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge curl >/dev/null
fi

# -- munge ------------------------------------------------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating a munge key"
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    rm -f /run/munge/munge.socket.2 /run/munge/*.pid
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

# -- slurm.conf -------------------------------------------------------------------------------
cpus="$(nproc)"
# Leave a tenth of the memory to the system; jobs must ask --mem explicitly anyway.
mem_mb="$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)"
install -d -o slurm -g slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
want="$(cat <<CONF
# Written by .ci/slurm-setup.sh: a single-node test cluster.
ClusterName=opd-test
SlurmctldHost=${node}
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120): the
# preemption test requeues, so keep it short here.
AuthInfo=cred_expire=10
# ... and is started by the next scheduling pass: make passes frequent (default 60 s, backfill 30 s).
SchedulerParameters=sched_interval=2,bf_interval=2
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SchedulerType=sched/backfill
SlurmUser=slurm
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=300
KillWait=30
InactiveLimit=0
NodeName=${node} CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=${node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
)"
if [[ ! -f $conf ]] || [[ "$(cat "$conf")" != "$want" ]]; then
    log "writing $conf (node $node, $cpus CPUs, ${mem_mb} MB)"
    mkdir -p /etc/slurm
    printf '%s\n' "$want" >"$conf"
    # A changed config needs fresh daemons.
    for pidfile in /run/slurm/slurmd.pid /run/slurm/slurmctld.pid; do
        [[ -s $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    sleep 1
fi

# -- daemons ----------------------------------------------------------------------------------
running() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
if ! running /run/slurm/slurmctld.pid; then
    log "starting slurmctld"
    slurmctld
fi
if ! running /run/slurm/slurmd.pid; then
    log "starting slurmd"
    slurmd
fi

for _ in $(seq 100); do
    if scontrol ping 2>/dev/null | grep -q "is UP"; then break; fi
    sleep 0.2
done
state="$(sinfo -h -n "$node" -o %T 2>/dev/null | head -n1)"
if [[ "$state" =~ ^(down|drained|draining) ]]; then
    scontrol update NodeName="$node" State=RESUME || true
fi
for _ in $(seq 100); do
    slurm_up && break
    sleep 0.2
done
if ! timeout 60 srun -N1 --mem=10 -t 1 true; then
    log "srun failed; see /var/log/slurm/slurmctld.log and slurmd.log"
    exit 1
fi
log "SLURM up on $node ($(sinfo -h -o '%P %D %T' | head -n1))"
