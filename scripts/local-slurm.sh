#!/usr/bin/env bash
# A one-machine Slurm cluster on this host, for tests and CI (Debian/Ubuntu, run as root).
#
#   scripts/local-slurm.sh start    install slurm-wlm + munge if missing, write the config, start the
#                                   daemons, wait until `sinfo` shows this node idle (idempotent)
#   scripts/local-slurm.sh status   daemons, sinfo, squeue; exit 0 only when the cluster answers
#   scripts/local-slurm.sh stop     cancel this cluster's jobs, stop the daemons this script started
#
# Environment:
#   SLURM_LOCAL_DIR   state, spool, logs and pid files (default /tmp/distrib-slurm):
#                       slurm.conf  log/slurmctld.log  log/slurmd.log  state/  spool/  *.pid
#   SLURM_PARTITION   partition name (default "debug"; the default partition)
#   SLURM_START_TIMEOUT  seconds to wait for the node to become idle (default 90)
#
# GLOBAL side effects (this script assumes it owns the machine, e.g. a CI runner or a test VM):
#   * installs the Debian packages slurm-wlm and munge (apt-get update once, noninteractive);
#   * writes /etc/slurm/slurm.conf (a copy of $SLURM_LOCAL_DIR/slurm.conf), because slurmd, the
#     slurmstepd of every job and the client commands all read that path; a slurm.conf this script
#     did not write is kept as /etc/slurm/slurm.conf.distrib-backup and put back by `stop`;
#   * creates /etc/munge/munge.key if the package did not, and /run/munge;
#   * appends "127.0.0.1 <hostname>" to /etc/hosts if this host's name does not resolve (the node
#     name is also the rendezvous address MASTER_ADDR of a training job).
# munged runs as user munge; slurmctld and slurmd run as root (SlurmUser=root, jobs run as the
# submitting user). `stop` kills only daemons whose pid this script recorded when it started them.
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/distrib-slurm}
PARTITION=${SLURM_PARTITION:-debug}
START_TIMEOUT=${SLURM_START_TIMEOUT:-90}
CONF=/etc/slurm/slurm.conf
MARK="# written by distrib scripts/local-slurm.sh"
HOST=$(hostname -s)

log() { echo "local-slurm: $*" >&2; }
# exit codes: 1 other, 2 usage, 10 packages cannot be installed, 11 a daemon does not start, 12 node not idle,
# 13 not root
die() { log "error: $*"; exit 1; }
fail() { local code=$1; shift; log "error: $*"; exit "$code"; }

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
pid_of() { if [ -s "$1" ]; then tr -dc '0-9' <"$1"; fi; }

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || fail 10 "apt-get not found; install slurm-wlm and munge by hand"
    log "installing slurm-wlm munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || fail 10 "apt-get update failed"
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
        || fail 10 "apt-get install slurm-wlm munge failed"
    if ! { command -v slurmctld && command -v slurmd && command -v munged; } >/dev/null; then
        fail 10 "apt-get install slurm-wlm munge did not provide slurmctld/slurmd/munged"
    fi
}

write_config() {
    mkdir -p "$DIR"/{state,spool,log}
    local cpus mem_mb
    cpus=$(nproc)
    mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    cat >"$DIR/slurm.conf.new" <<CONF
$MARK (SLURM_LOCAL_DIR=$DIR)
ClusterName=distrib-local
SlurmctldHost=$HOST
AuthType=auth/munge
CryptoType=crypto/munge
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
# a job asks to be requeued (scontrol requeue, --requeue on node failure); this is also the default
JobRequeue=1
# seconds between SIGTERM and SIGKILL when a job is cancelled, preempted or times out
KillWait=30
MinJobAge=300
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmdSpoolDir=$DIR/spool
StateSaveLocation=$DIR/state
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
# schedule often: a test cluster should start pending (e.g. requeued) jobs within seconds
SchedulerParameters=bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=$HOST CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
    mv "$DIR/slurm.conf.new" "$DIR/slurm.conf"
    mkdir -p /etc/slurm
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF" && [ ! -e "$CONF.distrib-backup" ]; then
        log "keeping the existing $CONF as $CONF.distrib-backup"
        cp -p "$CONF" "$CONF.distrib-backup"
    fi
    CONF_CHANGED=""
    if ! cmp -s "$DIR/slurm.conf" "$CONF"; then
        CONF_CHANGED=1
        cp "$DIR/slurm.conf" "$CONF.tmp.$$" && mv "$CONF.tmp.$$" "$CONF"
        log "wrote $CONF"
    fi
}

check_hostname() {
    if ! getent hosts "$HOST" >/dev/null; then
        log "hostname $HOST does not resolve; adding '127.0.0.1 $HOST' to /etc/hosts"
        echo "127.0.0.1 $HOST" >>/etc/hosts
    fi
}

munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_ok; then
        return 0
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key --force
        else
            dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
        fi
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    log "starting munged"
    # --force: get past a stale socket left by a munged that died without cleaning up
    runuser -u munge -- /usr/sbin/munged --force --pid-file=/run/munge/munged.pid \
        || fail 11 "munged failed to start (see /var/log/munge/munged.log)"
    for _ in $(seq 50); do munge_ok && break; sleep 0.2; done
    munge_ok || fail 11 "munged started but munge -n | unmunge fails (see /var/log/munge/munged.log)"
    pid_of /run/munge/munged.pid >"$DIR/munged.started-pid"
}

# start_daemon NAME PIDFILE CMD...: start unless the pid in PIDFILE is alive
start_daemon() {
    local name=$1 pidfile=$2
    shift 2
    if alive "$(pid_of "$pidfile")"; then
        return 0
    fi
    log "starting $name"
    "$@" || fail 11 "$name failed to start; see $DIR/log/$name.log"
    for _ in $(seq 50); do alive "$(pid_of "$pidfile")" && break; sleep 0.2; done
    alive "$(pid_of "$pidfile")" || fail 11 "$name exited at start; see $DIR/log/$name.log: $(tail -n 20 "$DIR/log/$name.log" 2>/dev/null)"
    pid_of "$pidfile" >"$DIR/$name.started-pid"
}

wait_idle() {
    local deadline=$((SECONDS + START_TIMEOUT)) state=""
    while [ $SECONDS -lt $deadline ]; do
        state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null | head -n1 || true)
        case "$state" in
            idle | mix | alloc | comp)
                log "node $HOST is $state (partition $PARTITION, $(nproc) CPUs)"
                return 0 ;;
            down | drain | drng | fail)
                # a node that slurmd has re-registered but that stays down/drained from an old run
                scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    log "node $HOST is not idle after ${START_TIMEOUT}s (state '${state:-unknown}')"
    tail -n 30 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 2>/dev/null || true
    exit 12
}

cmd_start() {
    [ "$(id -u)" -eq 0 ] || fail 13 "must run as root (installs packages, starts slurmd as root)"
    install_packages
    mkdir -p "$DIR"
    check_hostname
    write_config
    start_munge
    # If the config changed under running daemons, they would disagree: reconfigure them.
    if [ -n "$CONF_CHANGED" ] && alive "$(pid_of "$DIR/slurmctld.pid")" && alive "$(pid_of "$DIR/slurmd.pid")"; then
        scontrol reconfigure >/dev/null 2>&1 || true
    fi
    start_daemon slurmctld "$DIR/slurmctld.pid" slurmctld -f "$CONF"
    start_daemon slurmd "$DIR/slurmd.pid" slurmd -f "$CONF"
    wait_idle
}

# stop_pid NAME FILE: TERM, then KILL after 15s, the pid recorded in FILE (if alive)
stop_pid() {
    local name=$1 file=$2 pid
    pid=$(pid_of "$file")
    rm -f "$file"
    alive "$pid" || return 0
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 75); do alive "$pid" || return 0; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
}

cmd_stop() {
    if [ -s "$DIR/slurmctld.started-pid" ] && alive "$(pid_of "$DIR/slurmctld.pid")"; then
        # Cancel every job of this throwaway cluster first, so no training process outlives slurmd.
        local jobs
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            log "cancelling jobs: $(echo "$jobs" | tr '\n' ' ')"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 45); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 1; done
        fi
    fi
    stop_pid slurmd "$DIR/slurmd.started-pid"
    stop_pid slurmctld "$DIR/slurmctld.started-pid"
    stop_pid munged "$DIR/munged.started-pid"
    if [ -f "$CONF.distrib-backup" ]; then
        log "restoring $CONF from $CONF.distrib-backup"
        mv "$CONF.distrib-backup" "$CONF"
    fi
}

cmd_status() {
    local rc=0 name pid
    for name in slurmctld slurmd; do
        pid=$(pid_of "$DIR/$name.pid")
        if alive "$pid"; then echo "$name: running (pid $pid)"; else echo "$name: not running"; rc=3; fi
    done
    if munge_ok; then echo "munged: running"; else echo "munged: not running"; rc=3; fi
    if [ $rc -eq 0 ]; then
        sinfo || rc=3
        squeue || true
    fi
    return $rc
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status   (state in \$SLURM_LOCAL_DIR, default /tmp/distrib-slurm)" >&2; exit 2 ;;
esac
