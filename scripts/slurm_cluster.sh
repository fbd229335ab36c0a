#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, for the test suite (and for trying the sbatch scripts).
#
#   scripts/slurm_cluster.sh start    install (idempotent) + start munged, slurmctld, two slurmd; wait for idle
#   scripts/slurm_cluster.sh stop     stop the daemons this script started (by their pid files)
#   scripts/slurm_cluster.sh status   daemons, sinfo, squeue
#   scripts/slurm_cluster.sh env      print `export SLURM_CONF=...` for a shell that wants to use the cluster
#
# Why it looks like this:
# - Debian's slurm-wlm (bookworm: 22.05.8) and munge, installed with apt-get; needs root. Services are not
#   started by the packages (a policy-rc.d denies it during install): this script starts every daemon itself,
#   so it works in containers without systemd.
# - Two "nodes", slurm-n1 and slurm-n2, are two slurmd processes (`slurmd -N <name>`) on 127.0.0.1 with distinct
#   ports. The names are added to /etc/hosts (marked lines) because the launcher uses the first node's name as
#   torchrun's master address, exactly as on a real cluster.
# - No cgroups (proctrack/linuxproc, task/none): containers rarely allow them. select/cons_tres with CR_CPU,
#   each node claims the machine's CPUs (oversubscribed 2x on purpose: the tests' ranks are tiny).
# - JobRequeue=1 so `scontrol requeue` works; AuthInfo=cred_expire=10 because a requeued job waits
#   cred_expire+1 seconds (default 120) before it may start again; jobcomp/filetxt records every end of a job
#   (a requeued job shows up once per run) because there is no slurmdbd for sacct here.
# - Everything lives under $SLURM_CLUSTER_DIR (default /tmp/pretrain-slurm). /etc/slurm/slurm.conf is pointed at
#   it only if that file is absent or was written by this script, so a real cluster's config is never touched.
set -euo pipefail

DIR="${SLURM_CLUSTER_DIR:-/tmp/pretrain-slurm}"
CONF="$DIR/slurm.conf"
NODES=(slurm-n1 slurm-n2)
PORTS=(17101 17102)
CTLD_PORT=17100
MARK="# pretrain-local-slurm"
export SLURM_CONF="$CONF"

log() { echo "slurm_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    [[ $(id -u) == 0 ]] || die "installing slurm-wlm needs root (apt-get)"
    command -v apt-get >/dev/null || die "apt-get not found: install slurmctld, slurmd, slurm-client, munge by hand"
    log "installing slurmctld slurmd slurm-client munge (Debian packages)"
    # The packages would try to start their services; deny that, we start the daemons ourselves below.
    local policy=/usr/sbin/policy-rc.d had_policy=0
    [[ -e $policy ]] && had_policy=1
    if [[ $had_policy == 0 ]]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; fi
    export DEBIAN_FRONTEND=noninteractive
    local ok=0
    for attempt in 1 2; do
        if [[ $attempt == 2 ]] || ! apt-cache show slurmd >/dev/null 2>&1; then apt-get update -q >/dev/null; fi
        if apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >"$DIR/apt.log" 2>&1
        then ok=1; break; fi
    done
    [[ $had_policy == 0 ]] && rm -f "$policy"
    [[ $ok == 1 ]] || die "apt-get install failed; see $DIR/apt.log"
}

write_hosts() {
    # Node names must resolve (slurm's hostlist and torchrun's master address use them).
    local name
    for name in "${NODES[@]}"; do
        if ! getent hosts "$name" >/dev/null; then echo "127.0.0.1 $name $MARK" >>/etc/hosts; fi
    done
}

write_conf() {
    local cpus host
    cpus=$(nproc)
    host=$(hostname -s)
    mkdir -p "$DIR"/{state,log,run,spool/slurm-n1,spool/slurm-n2}
    cat >"$CONF.tmp" <<EOF
$MARK: written by scripts/slurm_cluster.sh; a 2-node cluster on one machine for tests.
ClusterName=pretrain-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again only cred_expire+1 s after the requeue (default 120 s); 10 s keeps the
# preemption test short. Job-step credentials live that long too: plenty on one machine.
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
SlurmdTimeout=120
InactiveLimit=0
Waittime=0
NodeName=slurm-n1 NodeHostname=slurm-n1 NodeAddr=127.0.0.1 Port=${PORTS[0]} CPUs=$cpus State=UNKNOWN
NodeName=slurm-n2 NodeHostname=slurm-n2 NodeAddr=127.0.0.1 Port=${PORTS[1]} CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=slurm-n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    mv "$CONF.tmp" "$CONF"
    # Plain `sinfo` in a shell finds the cluster too, unless a real cluster owns /etc/slurm/slurm.conf.
    mkdir -p /etc/slurm
    if [[ ! -e /etc/slurm/slurm.conf ]] || grep -q "$MARK" /etc/slurm/slurm.conf 2>/dev/null; then
        cp "$CONF" /etc/slurm/slurm.conf
    fi
}

alive() {  # alive PIDFILE: the process named in it runs
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

start_munge() {
    local pidfile=/run/munge/munged.pid
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi  # a munged already serves
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged --pid-file="$pidfile"
    local i
    for i in $(seq 50); do
        munge -n </dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    die "munged did not come up (see /var/log/munge/munged.log)"
}

start_daemons() {
    if ! alive "$DIR/run/slurmctld.pid"; then
        # -c: start from a clean state; jobs of an earlier session (whose files are gone) are not resurrected.
        slurmctld -f "$CONF" -c
    fi
    local name
    for name in "${NODES[@]}"; do
        if ! alive "$DIR/run/slurmd-$name.pid"; then slurmd -f "$CONF" -N "$name"; fi
    done
}

wait_idle() {
    local i state
    for i in $(seq 120); do
        state=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u | awk '{print $2}' | sort -u | tr '\n' ' ')
        if [[ $(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l) == "${#NODES[@]}" ]]; then
            log "cluster up: ${NODES[*]} idle (slurm $(sinfo -V | awk '{print $2}'), SLURM_CONF=$CONF)"
            return
        fi
        # A node that registered as down (e.g. after an unclean stop) is put back to work.
        if [[ $state == *down* || $state == *drain* ]]; then
            scontrol update nodename=slurm-n[1-2] state=resume >/dev/null 2>&1 || true
        fi
        sleep 0.5
    done
    sinfo -N -l >&2 || true
    tail -n 20 "$DIR"/log/*.log >&2 || true
    die "nodes did not become idle in 60 s"
}

stop() {
    local pidfile pid i
    # Jobs left over (a test that failed mid-way) would keep their slurmstepd and ranks alive past the daemons.
    if alive "$DIR/run/slurmctld.pid"; then
        squeue -h -o %A 2>/dev/null | xargs -r scancel 2>/dev/null || true
        for i in $(seq 50); do [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break; sleep 0.2; done
    fi
    for pidfile in "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid"; do
        [[ -s $pidfile ]] || continue
        pid=$(cat "$pidfile")
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
        fi
        rm -f "$pidfile"
    done
    # munged is left running only if someone else started it; ours has our pid file.
    if alive /run/munge/munged.pid && [[ -e $DIR/run/munged.ours ]]; then
        kill -TERM "$(cat /run/munge/munged.pid)" 2>/dev/null || true
        rm -f "$DIR/run/munged.ours"
    fi
    log "stopped"
}

status() {
    local f
    for f in /run/munge/munged.pid "$DIR/run/slurmctld.pid" "$DIR"/run/slurmd-*.pid; do
        if alive "$f"; then echo "running  $f ($(cat "$f"))"; else echo "stopped  $f"; fi
    done
    sinfo -N -l || true
    squeue || true
}

case "${1:-}" in
    start)
        mkdir -p "$DIR"
        install_packages
        write_hosts
        write_conf
        alive /run/munge/munged.pid || touch "$DIR/run/munged.ours"
        start_munge
        start_daemons
        wait_idle
        ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
