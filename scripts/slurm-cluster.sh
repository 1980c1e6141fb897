#!/usr/bin/env bash
# A private single-node Slurm cluster (Debian's slurm-wlm 22.05) whose whole state lives in DIR:
# slurm.conf, state save location, slurmd spool, logs and pid files. The test suite starts one per
# session (tests/slurm/conftest.py); it is also handy for trying the sbatch scripts by hand:
#
#   scripts/slurm-cluster.sh start /tmp/slurm      # prints: export SLURM_CONF=/tmp/slurm/slurm.conf
#   eval "$(scripts/slurm-cluster.sh start /tmp/slurm)"; sbatch --wrap hostname; squeue
#   scripts/slurm-cluster.sh status /tmp/slurm      # exit 0: both daemons up and answering
#   scripts/slurm-cluster.sh stop /tmp/slurm        # cancels jobs, kills daemons and leftover steps
#
# start and stop are idempotent. The daemons run as root with auth/none and cred/none: no munge,
# no cgroups, no systemd. They listen on loopback ports chosen at start (written into slurm.conf),
# so several clusters, or a site's real slurmd, can coexist on one machine.
#
# Environment knobs:
#   SLURM_CLUSTER_CPUS=N       CPUs the node advertises (default: nproc). More than the machine has
#                              is accepted (config_overrides): useful to run more 1-CPU jobs at once.
#   SLURM_CLUSTER_TIMEOUT=S    how long start waits for the node to be idle (default 60)
set -euo pipefail
# The daemons live in sbin, which is not on a non-root PATH on Debian.
PATH=$PATH:/usr/sbin:/sbin

log() { printf '[slurm-cluster] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
  echo "usage: $0 start|stop|status DIR" >&2
  exit 2
}

[ $# -eq 2 ] || usage
action=$1
[ "$action" = start ] && mkdir -p "$2"
[ -d "$2" ] || { echo "[slurm-cluster] no cluster in $2 (not a directory)" >&2; [ "$action" = stop ] && exit 0; exit 3; }
dir=$(cd "$2" && pwd)
conf=$dir/slurm.conf

# --- processes -----------------------------------------------------------------
# slurmctld and slurmd carry this variable in their environment; a slurmstepd overwrites its
# environment with its process title, but keeps SlurmdLogFile (DIR/log/slurmd.log) open. Either mark,
# on a process named like a Slurm daemon, is what `stop` looks for: never a user's shell that merely
# exported SLURM_CONF.
marker="HPC_LOCALSGD_SLURM_CLUSTER=$dir"

daemon_pids() {  # slurmctld, slurmscriptd, slurmd and slurmstepd processes of this cluster
  local proc pid comm fd
  for proc in /proc/[0-9]*; do
    pid=${proc#/proc/}
    comm=$(cat "$proc/comm" 2>/dev/null) || continue
    case $comm in slurmctld|slurmscriptd|slurmd|slurmstepd) ;; *) continue ;; esac
    if tr '\0' '\n' 2>/dev/null <"$proc/environ" | grep -qxF "$marker"; then
      echo "$pid"
      continue
    fi
    for fd in "$proc"/fd/*; do
      case $(readlink "$fd" 2>/dev/null) in
        "$dir"/*) echo "$pid"; break ;;
      esac
    done
  done
}

descendants() {  # all processes below the given pids (job tasks below a slurmstepd)
  local -A parent_of=()
  local stat pid rest ppid
  for stat in /proc/[0-9]*/stat; do
    read -r rest 2>/dev/null <"$stat" || continue
    pid=${rest%% *}
    rest=${rest##*) }  # the command name may contain spaces; fields after ") " are fixed
    read -r _ ppid _ <<<"$rest"
    parent_of[$pid]=$ppid
  done
  local -A seen=()
  local changed=1
  for pid in "$@"; do seen[$pid]=1; done
  while [ "$changed" = 1 ]; do
    changed=0
    for pid in "${!parent_of[@]}"; do
      if [ -z "${seen[$pid]:-}" ] && [ -n "${seen[${parent_of[$pid]}]:-}" ]; then
        seen[$pid]=1
        echo "$pid"
        changed=1
      fi
    done
  done
}

pid_alive() {  # a zombie (killed, not yet reaped) is not alive
  [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null || return 1
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}
read_pid() { [ -s "$1" ] && cat "$1" || true; }

daemons_running() {
  pid_alive "$(read_pid "$dir/run/slurmctld.pid")" && pid_alive "$(read_pid "$dir/run/slurmd.pid")"
}

# --- configuration -------------------------------------------------------------
port_in_use() {  # listening or bound on any address, IPv4 or IPv6
  local hex
  hex=$(printf '%04X' "$1")
  awk -v p=":$hex" 'NR > 1 && substr($2, length($2) - 4) == p { found = 1 } END { exit !found }' \
    /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

free_port() {  # below the kernel's ephemeral range, so no outgoing connection takes it meanwhile
  local port tries
  for tries in $(seq 200); do
    port=$((20000 + RANDOM % 12000))
    if ! port_in_use "$port" && [ "$port" != "${1:-}" ]; then
      echo "$port"
      return
    fi
  done
  die "no free TCP port found in 20000-31999"
}

write_conf() {
  local node cpus ctld_port slurmd_port cluster
  node=$(hostname -s)
  cpus=${SLURM_CLUSTER_CPUS:-$(nproc)}
  [[ $cpus =~ ^[1-9][0-9]*$ ]] || die "SLURM_CLUSTER_CPUS must be a positive integer, got '$cpus'"
  ctld_port=$(free_port)
  slurmd_port=$(free_port "$ctld_port")
  # The cluster name is recorded in the state save location, and slurmctld refuses to start when it
  # changes: derive it from DIR so that a restart in the same DIR finds the same name.
  cluster=lsgd$(printf '%s' "$dir" | cksum | cut -d' ' -f1)
  mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/run"
  : >"$dir/plugstack.conf"  # no site SPANK plugins from /etc/slurm
  cat >"$conf" <<EOF
# Written by scripts/slurm-cluster.sh on $(date -Is); rewritten (new ports) at every start.
ClusterName=$cluster
# Loopback addresses: the short hostname need not resolve to an address slurmd can bind.
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
# A requeued job may start again only after its old step credentials expire: 5 s is the smallest
# value Slurm accepts (the default, 120 s, makes every requeue take two minutes).
AuthInfo=cred_expire=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
PlugStackConfig=$dir/plugstack.conf
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups, no PAM, no munge: runs in containers and as root.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.log
PropagateResourceLimits=NONE
MailProg=/bin/true
MpiDefault=none
SchedulerType=sched/backfill
# Scan the queue every second, so a requeued job (eligible again cred_expire seconds later)
# starts promptly instead of at the next 60 s pass.
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
JobRequeue=1
# Finished jobs stay visible to scontrol this long (there is no slurmdbd, so no sacct).
MinJobAge=300
KillWait=5
InactiveLimit=0
ReturnToService=2
SlurmdTimeout=30
MessageTimeout=10
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=2048 State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

# --- actions -------------------------------------------------------------------
log_tails() {
  local f
  for f in "$dir/log/slurmctld.log" "$dir/log/slurmd.log" "$dir/log/slurmctld.out" "$dir/log/slurmd.out"; do
    [ -s "$f" ] || continue
    echo "----- tail $f" >&2
    tail -n 20 "$f" >&2
  done
}

stop_cluster() {
  local pids pid i
  # Cancel the jobs first, so their steps end the way Slurm ends them (signals, epilogue).
  if daemons_running; then
    SLURM_CONF=$conf scancel --quiet --full --signal=KILL --state=RUNNING --user=root 2>/dev/null || true
    SLURM_CONF=$conf scancel --quiet --user=root 2>/dev/null || true
    for i in $(seq 20); do
      [ -z "$(SLURM_CONF=$conf squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
  pids=$(daemon_pids)
  [ -z "$pids" ] && return 0
  # Job tasks that outlived their step (their slurmstepd is killed below) go with it.
  # shellcheck disable=SC2086
  pids="$pids $(descendants $pids)"
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  for i in $(seq 20); do
    local alive=""
    for pid in $pids; do pid_alive "$pid" && alive="$alive $pid"; done
    [ -z "$alive" ] && break
    sleep 0.25
  done
  for pid in $pids; do pid_alive "$pid" && kill -KILL "$pid" 2>/dev/null || true; done
  for i in $(seq 20); do
    [ -z "$(daemon_pids)" ] && break
    sleep 0.25
  done
  [ -z "$(daemon_pids)" ] || die "processes of the cluster in $dir survive SIGKILL: $(daemon_pids | tr '\n' ' ')"
  rm -f "$dir/run/slurmctld.pid" "$dir/run/slurmd.pid"
}

node_state() {
  SLURM_CONF=$conf sinfo -h -n "$(hostname -s)" -o %T 2>/dev/null | head -n 1 || true
}

launch_daemons() {  # 0 once the node is idle; 1 when a daemon died or the node stayed unusable
  local timeout=$1 i
  # Daemonized (no -D): each writes its pid file and logs to DIR/log. The .out files keep what a
  # daemon prints before its log file is open (a fatal configuration error).
  env "$marker" SLURM_CONF="$conf" slurmctld -f "$conf" >"$dir/log/slurmctld.out" 2>&1 </dev/null || return 1
  env "$marker" SLURM_CONF="$conf" slurmd -f "$conf" -N "$(hostname -s)" >"$dir/log/slurmd.out" 2>&1 </dev/null ||
    return 1
  for i in $(seq $((timeout * 4))); do
    state=$(node_state)
    [ "$state" = idle ] && return 0
    daemons_running || return 1
    sleep 0.25
  done
  return 1
}

start_cluster() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sinfo >/dev/null ||
    die "slurmctld, slurmd and sinfo are needed: run scripts/install.sh (apt: slurmctld slurmd slurm-client)"
  if daemons_running; then
    case $(node_state) in
      idle|mixed|allocated|completing) log "already running in $dir"; return 0 ;;
    esac
  fi
  stop_cluster  # whatever half of a cluster is left from before
  local timeout=${SLURM_CLUSTER_TIMEOUT:-60} attempt state="" ctld_log_size slurmd_log_size
  for attempt in 1 2 3; do
    write_conf
    ctld_log_size=$(stat -c %s "$dir/log/slurmctld.log" 2>/dev/null || echo 0)
    slurmd_log_size=$(stat -c %s "$dir/log/slurmd.log" 2>/dev/null || echo 0)
    launch_daemons "$timeout" && return 0
    # Another program may have bound a port between the probe and the daemon: new ports, once more.
    if { tail -c +$((ctld_log_size + 1)) "$dir/log/slurmctld.log"; tail -c +$((slurmd_log_size + 1)) "$dir/log/slurmd.log"
       } 2>/dev/null | grep -qiE 'address already in use|unable to bind'; then
      log "a port was taken; retrying with new ports"
      stop_cluster
      continue
    fi
    break
  done
  if daemons_running; then
    log "the node did not become idle within ${timeout}s (state: '${state:-no answer}')"
  else
    log "a daemon exited at start"
  fi
  log_tails
  stop_cluster
  exit 1
}

case $action in
  start)
    start_cluster
    echo "export SLURM_CONF=$conf" >"$dir/env"
    log "up: cluster $(sed -n 's/^ClusterName=//p' "$conf"), node $(hostname -s), ports" \
        "$(sed -n 's/^SlurmctldPort=//p' "$conf")/$(sed -n 's/^SlurmdPort=//p' "$conf"), logs in $dir/log"
    echo "export SLURM_CONF=$conf"
    ;;
  stop)
    stop_cluster
    log "stopped ($dir)"
    ;;
  status)
    if daemons_running && SLURM_CONF=$conf sinfo; then
      echo "export SLURM_CONF=$conf"
    else
      log "not running ($dir)"
      exit 3
    fi
    ;;
  *) usage ;;
esac
