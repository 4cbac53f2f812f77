#!/usr/bin/env bash
# A one-node SLURM cluster on localhost, for tests and CI (needs root: apt-get and the daemons).
#
#   bash tools/slurm_cluster.sh start    install slurm-wlm + munge if missing, configure, start, wait for the node
#   bash tools/slurm_cluster.sh stop     stop the daemons by their pid files, keep the config
#   bash tools/slurm_cluster.sh env      print `export SLURM_CONF=...` for the client commands (sbatch, squeue)
#
# Idempotent: `start` on a running cluster only checks it. Everything lives in $MEGAMEM_SLURM_DIR
# (default /tmp/megamem-slurm): config, munge key and socket, pid files, logs, spool. No systemd or
# cgroups: proctrack/pgid and task/none work in plain containers.
set -euo pipefail
DIR=${MEGAMEM_SLURM_DIR:-/tmp/megamem-slurm}
PORT=${MEGAMEM_SLURM_PORT:-6817}          # slurmctld; slurmd listens on PORT+1
CONF="$DIR/slurm.conf"
MUNGE_SOCKET="$DIR/munge/munge.socket.2"

log() { echo "[slurm-cluster] $*" >&2; }

alive() {  # alive PIDFILE: the process named in PIDFILE is running
  [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
    && command -v sbatch >/dev/null && return 0
  [ "$(id -u)" = 0 ] || { echo "error: SLURM is not installed and installing it needs root (apt-get)" >&2; exit 3; }
  command -v apt-get >/dev/null || { echo "error: SLURM is not installed and apt-get is not available" >&2; exit 3; }
  log "installing slurm-wlm and munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_config() {
  mkdir -p "$DIR/spool/ctld" "$DIR/spool/d" "$DIR/log" "$DIR/munge"
  chmod 755 "$DIR" "$DIR/munge"   # munged refuses a socket directory others can write to
  [ -f "$DIR/munge.key" ] || mungekey --create --keyfile="$DIR/munge.key" >/dev/null 2>&1 \
    || dd if=/dev/urandom of="$DIR/munge.key" bs=1024 count=1 status=none
  chmod 600 "$DIR/munge.key"
  local cpus
  cpus=$(nproc)
  [ "$cpus" -ge 2 ] || cpus=2   # tests run 2 tasks; config_overrides lets a 1-core host claim 2
  # cred_expire=10: a requeued job may start again after 10 s instead of the default 120 s
  cat > "$CONF" <<EOF
ClusterName=megamem
SlurmctldHost=localhost
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
SchedulerParameters=bf_interval=1,sched_interval=2
MinJobAge=600
NodeName=localhost CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  install_packages
  if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && alive "$DIR/munged.pid"; then
    wait_ready
    return 0
  fi
  stop quiet
  write_config
  export SLURM_CONF="$CONF"
  munged --force --key-file="$DIR/munge.key" --socket="$MUNGE_SOCKET" --pid-file="$DIR/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge.seed"
  slurmctld -f "$CONF"
  slurmd -f "$CONF" -N localhost
  wait_ready
  log "running: export SLURM_CONF=$CONF"
}

wait_ready() {  # the node accepts jobs once it is idle (or mixed/allocated by earlier jobs)
  export SLURM_CONF="$CONF"
  for _ in $(seq 120); do
    state=$(sinfo -h -N -o %t 2>/dev/null | head -n1 || true)
    case "$state" in idle*|mix*|alloc*) return 0 ;; esac
    sleep 0.5
  done
  echo "error: the SLURM node did not become ready (state '${state:-none}'); see $DIR/log/" >&2
  exit 1
}

stop() {
  local pidfile pid
  for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/munged.pid"; do
    alive "$pidfile" || continue
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    rm -f "$pidfile"
  done
  [ "${1:-}" = quiet ] || log "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
