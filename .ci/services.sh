#!/usr/bin/env bash
# Services the launch tests use (tests/launch/), all on loopback addresses:
#   1. sshd on 127.0.0.1 + 127.0.0.2 and pdsh: "two nodes" for `zerollm launch --hostfile`
#   2. munge + slurmctld + slurmd: a one-node Slurm cluster for launch/slurm/*.sbatch
#   3. podman/buildah and a Debian base image made with debootstrap, for docker/Dockerfile
# Idempotent: a second run on the same machine checks each service and starts only what
# is missing. Runs as root, no stdin. SERVICES="ssh slurm podman" picks a subset.
set -euo pipefail
SERVICES=${SERVICES:-"ssh slurm podman"}
BASE_IMAGE=${ZEROLLM_BASE_IMAGE:-localhost/debian-base:bookworm}
BASE_TAR=${ZEROLLM_BASE_TAR:-/var/cache/zerollm/debian-base-bookworm.tar}
log() { echo "services: $*"; }
want() { case " $SERVICES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

pkgs="procps psmisc iproute2"
want ssh && pkgs+=" openssh-server openssh-client pdsh"
want slurm && pkgs+=" slurm-wlm munge"
want podman && pkgs+=" podman buildah debootstrap uidmap"
missing=$(dpkg-query -W -f='${Package} ${Status}\n' $pkgs 2>/dev/null | awk '$4 != "installed" {print $1}' || true)
for p in $pkgs; do dpkg-query -W "$p" >/dev/null 2>&1 || missing+=" $p"; done
if [ -n "${missing// /}" ]; then
  log "installing$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends $missing
fi

# ---------------------------------------------------------------- 1. sshd + pdsh
start_ssh() {
  mkdir -p -m 700 /root/.ssh /run/sshd
  [ -f /root/.ssh/id_ed25519 ] || ssh-keygen -q -t ed25519 -N "" -f /root/.ssh/id_ed25519
  touch /root/.ssh/authorized_keys && chmod 600 /root/.ssh/authorized_keys
  grep -qF "$(cat /root/.ssh/id_ed25519.pub)" /root/.ssh/authorized_keys ||
    cat /root/.ssh/id_ed25519.pub >>/root/.ssh/authorized_keys
  if ! grep -q "zerollm-loopback-nodes" /root/.ssh/config 2>/dev/null; then
    cat >>/root/.ssh/config <<'EOF'
# zerollm-loopback-nodes: the test "nodes" of tests/launch (no host-key prompts)
Host 127.0.0.*
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
  BatchMode yes
EOF
    chmod 600 /root/.ssh/config
  fi
  ssh-keygen -A >/dev/null
  if ! ssh -o ConnectTimeout=5 127.0.0.2 true 2>/dev/null; then
    log "starting sshd on 127.0.0.1 and 127.0.0.2"
    /usr/sbin/sshd -o ListenAddress=127.0.0.1 -o ListenAddress=127.0.0.2
    for _ in $(seq 20); do ssh -o ConnectTimeout=5 127.0.0.2 true 2>/dev/null && break; sleep 0.5; done
  fi
  ssh 127.0.0.1 true && ssh 127.0.0.2 true && log "sshd ok"
  PDSH_RCMD_TYPE=ssh pdsh -S -w 127.0.0.1,127.0.0.2 true && log "pdsh ok"
}

# ---------------------------------------------------------------- 2. munge + Slurm
start_slurm() {
  local host cpus
  host=$(hostname -s)
  cpus=$(nproc)
  [ -s /etc/munge/munge.key ] || mungekey -c -f -k /etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
    sleep 1
  fi
  mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  cat >/etc/slurm/slurm.conf.new <<EOF
# Written by zerollm .ci/services.sh: one-node test cluster, loopback only.
ClusterName=zerollm
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again cred_expire + 1 s after its requeue (Slurm's default: 120 s,
# most of the preemption test's wall time); 30 s still leaves step launches room under load.
AuthInfo=cred_expire=30
CommunicationParameters=NoInAddrAny
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
  if ! cmp -s /etc/slurm/slurm.conf.new /etc/slurm/slurm.conf; then
    mv /etc/slurm/slurm.conf.new /etc/slurm/slurm.conf
    if [ -f /run/slurmctld.pid ] && kill -0 "$(cat /run/slurmctld.pid)" 2>/dev/null; then
      scontrol reconfigure || true
    fi
  else
    rm -f /etc/slurm/slurm.conf.new
  fi
  if ! { [ -f /run/slurmctld.pid ] && kill -0 "$(cat /run/slurmctld.pid)" 2>/dev/null; }; then
    log "starting slurmctld"
    slurmctld
  fi
  if ! { [ -f /run/slurmd.pid ] && kill -0 "$(cat /run/slurmd.pid)" 2>/dev/null; }; then
    log "starting slurmd"
    slurmd
  fi
  for _ in $(seq 60); do
    state=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
    case "$state" in idle* | mix* | alloc*) break ;; esac
    sleep 1
  done
  case "$state" in
    down* | drain*) scontrol update nodename="$host" state=resume || true ;;
  esac
  sinfo
  srun -N1 -n1 true && log "slurm ok"
}

# ---------------------------------------------------------------- 3. podman base image
make_base_image() {
  if podman image exists "$BASE_IMAGE"; then
    log "podman base image $BASE_IMAGE present"
    return
  fi
  if [ ! -s "$BASE_TAR" ]; then
    local dir
    dir=$(mktemp -d /var/tmp/zerollm-debootstrap.XXXXXX)
    log "debootstrap bookworm into $dir (a few minutes)"
    debootstrap --variant=minbase bookworm "$dir" http://deb.debian.org/debian >/var/tmp/zerollm-debootstrap.log 2>&1 ||
      { tail -20 /var/tmp/zerollm-debootstrap.log; exit 1; }
    # The build's apt needs the same mirrors the machine uses.
    cp /etc/apt/sources.list.d/*.sources "$dir/etc/apt/sources.list.d/" 2>/dev/null || true
    rm -rf "$dir/var/cache/apt/archives/"*.deb
    mkdir -p "$(dirname "$BASE_TAR")"
    tar -C "$dir" -cf "$BASE_TAR.tmp" . && mv "$BASE_TAR.tmp" "$BASE_TAR"
    rm -rf "$dir"
  fi
  log "importing $BASE_TAR as $BASE_IMAGE"
  podman import "$BASE_TAR" "$BASE_IMAGE" >/dev/null
}

want ssh && start_ssh
want slurm && start_slurm
want podman && make_base_image
log "done"
