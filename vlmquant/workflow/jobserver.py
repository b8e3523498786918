"""Job server: a local run's jobs execute in forks of one process that imported torch, transformers and the library
once, instead of each job's own Python importing them again (about 5 CPU-seconds, most of the 5.7-7.3 s a demo model job
took on 2 CPU cores).

The Snakefile starts the server when a local run starts (`start`, in `onstart:`) and it stops with the run (the
Snakemake process exiting, or dying). Snakemake still starts one process per job; a model job's script first calls
`forward()`, which sends the server its script file (Snakemake's preamble included), working directory, environment,
argv and its stdin, stdout and stderr, then waits. The server imports torch, transformers and the library when the
first job comes (a run without model jobs imports nothing), then forks; the fork takes all of those, sets torch's
threads to the job's OMP_NUM_THREADS and runs the script file as `__main__`; its exit status becomes the job
process's, and a signal the job process gets (Snakemake stopping a job) is passed on to the fork. A job process
that dies takes its fork with it. The light jobs (calib, demo_data, summary, plots, lmms_eval) start in well under a
second and do not forward. Without a server (cluster jobs, a dry run, another Python, the environment variable
VLMQUANT_JOBSERVER=off) a script runs in its own process as before; the outputs are the same either way. Benchmark
files (`benchmark:`) time the job correctly but their memory columns then count the job process only.

Protocol on the Unix socket: the client sends an 8-byte length with its three file descriptors (SCM_RIGHTS), then
that many bytes of JSON; the server answers `pid N` when the fork started (`refused REASON` when it will not run
the job) and `exit N` when it ended (N < 0: killed by signal -N).
"""
import atexit
import importlib
import json
import os
import runpy
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback

ENV = "VLMQUANT_JOBSERVER"  # the socket's path in a run's environment; "off": no server
PRELOAD = ("torch", "transformers.modeling_utils", "transformers.models.auto.processing_auto", "snakemake.script",
           "vlmquant.models.loading", "vlmquant.search.pipeline", "vlmquant.eval.run", "vlmquant.export",
           "vlmquant.export.packed", "vlmquant.data.inputs", "vlmquant.models.tiny", "vlmquant.io.scales")
POLL_S = 0.5  # how often the server checks that the run that started it is still there
_served = False  # True in a fork of the server: forward() returns at once


# --- the job's side --------------------------------------------------------------------------------

def forward():
    """Run this script in the run's job server and exit with its status; return at once where there is none.

    Call it first in a Snakemake script. Raises SystemExit with the job's exit status (128 + N for a job ended by
    signal N); returns without side effects when VLMQUANT_JOBSERVER is unset or `off`, when the server cannot be
    reached or refuses the job (another Python), and in the server's own forks."""
    path = os.environ.get(ENV)
    main = sys.modules["__main__"]
    script = getattr(main, "__real_file__", None) or getattr(main, "__file__", None)  # Snakemake's copy, preamble
    if _served or not path or path == "off" or not script:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    job = json.dumps({"script": os.path.abspath(script), "cwd": os.getcwd(), "env": dict(os.environ),
                      "argv": sys.argv, "prefix": sys.prefix}).encode()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(path)
        socket.send_fds(client, [struct.pack("!Q", len(job))], [0, 1, 2])
        client.sendall(job)
        replies = client.makefile("r")
        first = replies.readline().split()
    except OSError:  # no server here (a cluster node, or the run that started it has ended), or it went away
        first = []
    if first[:1] != ["pid"]:  # refused, or not reached: the job runs here
        client.close()
        if first[:1] == ["refused"]:
            print(f"job server: refused ({' '.join(first[1:])}); the job runs in its own process", file=sys.stderr)
        return
    pid = int(first[1])
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: _kill(pid, signum))
    last = replies.readline().split()
    if last[:1] != ["exit"]:
        print(f"job server: it stopped while running {script}", file=sys.stderr)
        sys.exit(1)
    status = int(last[1])
    sys.exit(128 - status if status < 0 else status)


def _kill(pid, sig):
    try:
        os.killpg(pid, sig)
    except OSError:
        pass


# --- the run's side ----------------------------------------------------------------------------------

def start(workflow):
    """In `onstart:`: start the job server of a local run and point its jobs at it (VLMQUANT_JOBSERVER).

    Nothing happens for cluster executors (their jobs run elsewhere) or when VLMQUANT_JOBSERVER is `off`. The
    server runs this Python (`python -m vlmquant.workflow.jobserver SOCKET PID`) and ends when the process that
    started it does (it stops the server when it exits, or the server notices that it died)."""
    if os.environ.get(ENV) == "off" or not workflow.local_exec:
        return
    folder = tempfile.mkdtemp(prefix="vlmquant-jobs-")
    path = os.path.join(folder, "socket")
    server = subprocess.Popen([sys.executable, "-m", "vlmquant.workflow.jobserver", path, str(os.getpid())],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True, env={**os.environ, "PYTORCH_NVML_BASED_CUDA_CHECK": "1"})
    atexit.register(_stop, server, folder)
    os.environ[ENV] = path


def _stop(server, folder):
    server.terminate()
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    shutil.rmtree(folder, ignore_errors=True)  # where a SIGKILL left the socket


def serve(path, parent, preload=PRELOAD):
    """Accept jobs on the Unix socket `path` until the process `parent` is gone, then kill the running forks.

    The modules `preload` are imported when the first job comes, before it forks. CUDA must not be initialised
    here: a fork cannot use it then (hence the NVML-based device check that `start` sets; should an import load the
    CUDA driver all the same, every job is refused and runs in its own process)."""
    running = {}  # pid → the job's connection
    select = selectors.DefaultSelector()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path + ".tmp")
        os.rename(path + ".tmp", path)
        listener.listen(64)
        select.register(listener, selectors.EVENT_READ)
        while os.getppid() == parent:
            for key, _ in select.select(POLL_S):
                if key.fileobj is listener:
                    conn, _ = listener.accept()
                    if preload:
                        _import(preload)
                        preload = ()
                    pid = _start_job(conn, listener)
                    if pid:
                        running[pid] = conn
                        select.register(conn, selectors.EVENT_READ, pid)
                    else:
                        conn.close()
                else:  # readable job connection: its process is gone
                    _kill(key.data, signal.SIGKILL)
            _reap(running, select)
    finally:
        for pid in running:
            _kill(pid, signal.SIGKILL)
        time.sleep(0.1)
        _reap(running, select)
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def _import(names):
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # the job that needs it reports the error
            pass


def cuda_loaded(maps="/proc/self/maps"):
    """Whether this process has loaded the CUDA driver (libcuda), which a fork cannot use."""
    try:
        with open(maps) as f:
            return any("libcuda.so" in line for line in f)
    except OSError:
        return False


def _reap(running, select):
    while running:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if not pid:
            return
        conn = running.pop(pid, None)
        if conn is None:
            continue
        select.unregister(conn)
        try:
            conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
        except OSError:
            pass
        conn.close()


def _start_job(conn, listener):
    """Read one job from `conn` and fork it; its pid, or None when refused (another Python, or the CUDA driver loaded
    here: the reply says why and the job runs in its own process)."""
    data, fds, _, _ = socket.recv_fds(conn, 8, 3)
    if len(data) != 8 or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        return None
    size, = struct.unpack("!Q", data)
    raw = b""
    while len(raw) < size:
        chunk = conn.recv(size - len(raw))
        if not chunk:
            break
        raw += chunk
    job = json.loads(raw) if len(raw) == size else {}
    reason = ("incomplete request" if not job else
              f"another Python ({job['prefix']})" if job["prefix"] != sys.prefix else
              "CUDA initialised in the server" if cuda_loaded() else None)
    if reason:
        for fd in fds:
            os.close(fd)
        conn.sendall(f"refused {reason}\n".encode())
        return None
    pid = os.fork()
    if pid == 0:
        listener.close()
        conn.close()
        _run_job(job, fds)
    try:
        os.setpgid(pid, pid)  # also here, so that a signal passed on at once finds the group
    except OSError:
        pass
    for fd in fds:
        os.close(fd)
    conn.sendall(f"pid {pid}\n".encode())
    return pid


def _run_job(job, fds):
    """In the fork: become the job (its streams, folder, environment, threads) and run its script; never returns."""
    global _served
    _served = True
    code = 1
    try:
        os.setpgid(0, 0)  # its own group: the terminal's Ctrl-C reaches it once, through the job process
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        sys.argv = list(job["argv"])
        if "torch" in sys.modules and os.environ.get("OMP_NUM_THREADS", "").isdigit():
            sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        try:
            runpy.run_path(job["script"], run_name="__main__")
            code = 0
        except SystemExit as e:  # as Python's own exit: None is 0, a message is printed and is 1
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


if __name__ == "__main__":  # the forks must see this module's _served under its own name
    from vlmquant.workflow import jobserver
    jobserver.serve(sys.argv[1], int(sys.argv[2]))
