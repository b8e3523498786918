#!/bin/bash
# A single-node SLURM (Debian 12, slurm 22.05) without systemd, for tests: installs the Debian
# packages if missing, writes /etc/slurm/slurm.conf, starts munged, slurmctld and slurmd
# (partition `debug`; finished jobs stay in squeue for an hour, as there is no accounting database),
# and waits until the node is idle. Needs root. Stop it with slurm-down.sh.
set -euo pipefail
here=$(dirname "$0")
marker="# written by vlmquant tests/slurm/slurm-up.sh"
if [ -e /etc/slurm/slurm.conf ] && ! grep -qxF "$marker" /etc/slurm/slurm.conf; then
  echo "slurm-up.sh: /etc/slurm/slurm.conf exists and is not ours; not touching a real SLURM" >&2
  exit 1
fi
"$here/slurm-down.sh"   # daemons left over by an earlier run that was killed
pkgs="slurmctld slurmd slurm-client munge"
if ! dpkg -s $pkgs >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends $pkgs >/dev/null
fi
host=$(hostname -s)
mem=$(( $(free -m | awk '/^Mem:/{print $2}') - 1024 ))
mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
cat > /etc/slurm/slurm.conf <<CONF
$marker
ClusterName=vlmquant-test
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
MinJobAge=3600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
GresTypes=gpu
NodeName=$host CPUs=$(nproc) RealMemory=$mem Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
echo "NodeName=$host Name=gpu File=/dev/null" > /etc/slurm/gres.conf   # a GPU in name only: jobs that ask for one run
[ -s /etc/munge/munge.key ] || mungekey --create   # Debian's postinst normally creates it
chown munge:munge /run/munge
runuser -u munge -- /usr/sbin/munged
slurmctld -c   # daemonizes; -c: no jobs from an earlier run
slurmd
for _ in $(seq 60); do
  sinfo -h -o %T 2>/dev/null | grep -qx idle && { sinfo; exit 0; }
  sleep 0.5
done
echo "slurm-up.sh: node not idle after 30 s; see /var/log/slurm/" >&2
exit 1
