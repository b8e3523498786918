"""Job logging: a job's logging and stderr (tqdm) in its rule's log with one status line per progress bar on
Snakemake's terminal, any error as one line there (script_logging, which every script runs its one library call
in); and a run stopped by a signal without a failed job reported as one line saying so, instead of Snakemake's
"At least one job did not complete successfully" (watch, exit_if_stopped: on SIGTERM Snakemake's scheduler lets
the running jobs finish, starts no other, then reports the run as failed)."""
import contextlib
import logging
import re
import signal
import sys
import time
import traceback
from collections import Counter

from vlmquant import paths
from vlmquant.errors import VlmquantError
from vlmquant.io.fingerprint import use_cache

STATUS_EVERY = 30.0  # seconds between two status lines of one running progress bar
STATUS_MIN = 2  # seconds a progress bar must have run to be shown on the terminal
PROGRESS = re.compile(r"\d+/\d+ \[(?:(\d+):)?(\d+):(\d+)")  # tqdm: "n/total [elapsed<remaining, rate]"
BAR = re.compile(r"\s*\d+%\|[^|]*\|\s*")


def job_label(snakemake):
    """`rule wildcard values` of a Snakemake job (e.g. "search demo-qwen2vl/demo/mbq-w3g128/000")."""
    wildcards = "/".join(str(v) for v in snakemake.wildcards) if snakemake.wildcards else ""
    return f"{snakemake.rule} {wildcards}".strip()


class StatusStream:
    """A job's stderr: everything goes to the log; the final state of the job's own progress bar (the one named
    after its rule, e.g. `search`) and of every other bar that ran STATUS_MIN s or more (and of a running one
    every STATUS_EVERY s) also goes to Snakemake's terminal as one line `[job] desc: n/total [elapsed<remaining,
    rate]`."""

    def __init__(self, log, terminal, label):
        self.log, self.terminal, self.label = log, terminal, label
        self.own = label.split(" ")[0] + ":"
        self.line, self.last = "", time.monotonic()

    def write(self, text):
        self.log.write(text)
        for part in re.split(r"(\r|\n)", text):
            if part == "\n":
                self._status(final=True)
                self.line = ""
            elif part == "\r":
                self._status(final=False)
                self.line = ""
            else:
                self.line += part
        return len(text)

    def _status(self, final):
        now = time.monotonic()
        bar = PROGRESS.search(self.line)
        if not bar:
            return
        h, m, sec = (int(x or 0) for x in bar.groups())
        own = final and self.line.lstrip().startswith(self.own)
        if own or (3600 * h + 60 * m + sec >= STATUS_MIN and (final or now - self.last >= STATUS_EVERY)):
            self.terminal.write(f"[{self.label}] {BAR.sub(' ', self.line).strip()}\n")
            self.terminal.flush()
            self.last = now

    def flush(self):
        self.log.flush()

    def isatty(self):
        return False

    def fileno(self):
        return self.log.fileno()

    @property
    def encoding(self):
        return self.log.encoding


@contextlib.contextmanager
def script_logging(snakemake):
    """Run a job's body with logging and stderr (tqdm) in the rule's log, status lines on Snakemake's terminal.

    Any error's traceback goes into the log; one line also goes to the terminal: a VlmquantError's own
    line, or `Type: message (traceback in <log>)` for any other exception. The job then exits with 1.
    """
    use_cache(paths.FINGERPRINTS)  # the fingerprints the workflow computed at load
    log_path = snakemake.log[0] if snakemake.log else None
    terminal = sys.stderr
    label = job_label(snakemake)
    log = open(log_path, "w") if log_path else terminal
    stream = StatusStream(log, terminal, label) if log_path else terminal
    file_handler = logging.StreamHandler(stream)
    file_handler.setLevel(logging.INFO)
    handlers = [file_handler]
    if log_path:  # warnings also where the user looks
        terminal_handler = logging.StreamHandler(terminal)
        terminal_handler.setLevel(logging.WARNING)
        terminal_handler.setFormatter(logging.Formatter(f"[{label}] %(levelname)s: %(message)s"))
        handlers.append(terminal_handler)
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True)
    sys.stderr = stream
    try:
        yield
    except VlmquantError as e:
        print(f"error: {e}", file=log)
        if log_path:
            print(f"[{label}] error: {e}", file=terminal)
        sys.exit(1)
    except Exception as e:
        traceback.print_exc(file=log)
        if log_path:
            first = (str(e).strip().splitlines() or [""])[0]
            print(f"[{label}] error: {type(e).__name__}: {first} (traceback in {log_path})", file=terminal)
        sys.exit(1)
    finally:
        sys.stderr = terminal
        logging.basicConfig(level=logging.INFO, handlers=[logging.StreamHandler(terminal)], force=True)
        if log_path:
            log.close()


# --- a run stopped by a signal ---------------------------------------------------------------------
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
