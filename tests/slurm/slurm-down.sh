#!/bin/bash
# Cancel the jobs of the SLURM that slurm-up.sh started, stop its daemons by their PIDs, remove its config.
grep -qxF "# written by vlmquant tests/slurm/slurm-up.sh" /etc/slurm/slurm.conf 2>/dev/null || exit 0
if [ -s /run/slurmctld.pid ] && kill -0 "$(cat /run/slurmctld.pid)" 2>/dev/null; then
  squeue -h -t PENDING,RUNNING -o %A 2>/dev/null | xargs -r scancel
  for _ in $(seq 50); do [ -z "$(squeue -h -t RUNNING,COMPLETING -o %A 2>/dev/null)" ] && break; sleep 0.2; done
fi
for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
  if [ -s "$pidfile" ]; then
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null && for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    rm -f "$pidfile"
  fi
done
# Without a config, SLURM commands fail at once instead of retrying a controller that is gone for
# ~10 s (the executor plugin runs `scontrol show config` whenever Snakemake starts).
rm -f /etc/slurm/slurm.conf /etc/slurm/gres.conf
