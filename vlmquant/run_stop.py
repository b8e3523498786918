"""A run stopped by a signal without a failed job: one line saying so, instead of Snakemake's "At least one job
did not complete successfully". On SIGTERM Snakemake's scheduler lets the running jobs finish and starts no
other, then reports the run as failed."""
import signal
import sys
from collections import Counter

_received = []  # names of the signals recorded since watch()


def watch(sig=signal.SIGTERM):
    """Record `sig` (in `onstart:`, after Snakemake's scheduler installed its own handler), then hand it on."""
    previous = signal.getsignal(sig)

    def handler(signum, frame):
        _received.append(signal.Signals(signum).name)
        if callable(previous):
            previous(signum, frame)

    signal.signal(sig, handler)


def exit_if_stopped(scheduler):
    """In `onerror:`: when a watched signal came and no job failed, print what was stopped (the jobs not started,
    by rule) and exit with 128 + the signal's number. Otherwise return: Snakemake names the failed jobs."""
    if not _received or scheduler.failed:
        return
    left = Counter(job.rule.name for job in scheduler.remaining_jobs if job.output)  # not `rule all`
    jobs = ", ".join(f"{rule} {n}" for rule, n in sorted(left.items()))
    print(f"stopped by {_received[0]}: no job failed; the running jobs finished, {sum(left.values())} not started "
          f"({jobs or 'none'}); run the same command again to go on", file=sys.stderr)
    sys.exit(128 + signal.Signals[_received[0]].value)
