"""Snakemake dry runs (`snakemake -n …`) in forks of one process that imported Snakemake once (a forkserver per
test worker) instead of a new Python each: the imports are about 1.3 of the 2 CPU-seconds of a demo dry run,
and the tests make about 60. The output and exit status are those of `python -m snakemake`.

Light on purpose: the forkserver imports this module, so it imports nothing heavy (no torch)."""
import multiprocessing
import os
import sys
import tempfile
from pathlib import Path
from subprocess import CompletedProcess

PRELOAD = ["snakemake.cli", "snakemake.api", "vlmquant.workflow", "dry_run"]
_context = None


def _child(cwd, args, env, out, err):
    """In the fork: Snakemake's command line on `args`. Its SystemExit becomes the exit status as in Python itself
    (multiprocessing's process bootstrap, which also flushes the streams)."""
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_TRUNC), fd)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = ["snakemake", *args]
    from snakemake.cli import main

    main(list(args))


def dry_run(cwd, args, env):
    """CompletedProcess of `python -m snakemake *args` (a dry run) in the folder `cwd` with the environment `env`."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        out.touch()
        err.touch()
        child = _context.Process(target=_child, args=(str(cwd), list(args), dict(env), str(out), str(err)))
        child.start()
        child.join()
        return CompletedProcess(["snakemake", *args], child.exitcode, out.read_text(), err.read_text())
