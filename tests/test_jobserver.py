"""The job server runs a script as its own process would: streams, folder, environment, argv, exit status,
threads; a signal to the job process reaches the fork; a job process or a run that dies takes its forks along."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vlmquant.workflow import jobserver

SCRIPT = textwrap.dedent("""\
    from vlmquant.workflow.jobserver import forward

    forward()
    import os, sys, time
    import torch
    print(os.getpid(), os.getppid(), os.getcwd(), os.environ["JOB_VALUE"], torch.get_num_threads(), sys.argv[1:])
    print("to stderr", file=sys.stderr)
    if sys.argv[1] == "raise":
        raise ValueError("a job error")
    if sys.argv[1] == "sleep":
        open("started", "w").close()
        time.sleep(60)
    sys.exit(int(sys.argv[1]))
""")


def wait_for(check, seconds=30.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.05)
    return False


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.fixture
def server(tmp_path):
    """(socket path, server process) of a server whose parent is this test process."""
    path = str(tmp_path / "jobs" / "socket")
    os.makedirs(os.path.dirname(path))
    code = f"from vlmquant.workflow import jobserver; jobserver.serve({path!r}, {os.getpid()}, ('torch',))"
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    assert wait_for(lambda: os.path.exists(path))
    yield path, proc
    proc.terminate()
    proc.wait(10)
    assert not os.path.exists(os.path.dirname(path))  # socket and folder removed


def job(tmp_path, path, *args, **popen):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    env = {**os.environ, jobserver.ENV: path, "JOB_VALUE": "job-value", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), *args], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def test_job_runs_in_a_fork_with_its_folder_environment_streams_and_status(tmp_path, server):
    path, proc = server
    res = job(tmp_path, path, "3")
    out, err = res.communicate(timeout=60)
    pid, ppid, cwd, value, threads, argv = out.split(" ", 5)
    assert res.returncode == 3
    assert int(ppid) == proc.pid and int(pid) != res.pid
    assert (cwd, value, threads, argv.strip()) == (str(tmp_path / "work"), "job-value", "1", "['3']")
    assert err == "to stderr\n"


def test_exception_gives_its_traceback_and_status_1(tmp_path, server):
    res = job(tmp_path, server[0], "raise")
    out, err = res.communicate(timeout=60)
    assert res.returncode == 1 and "ValueError: a job error" in err


def test_without_a_server_the_job_runs_in_its_own_process(tmp_path):
    res = job(tmp_path, str(tmp_path / "no-socket"), "0")
    out, _ = res.communicate(timeout=60)
    assert res.returncode == 0 and int(out.split()[0]) == res.pid


def test_a_refused_job_says_why_and_runs_in_its_own_process(tmp_path, server):
    """A job from another Python (here: its sys.prefix changed before forward) is refused; one line in its log."""
    script = tmp_path / "other.py"
    script.write_text("import os, sys\nsys.prefix = '/another/python'\n" + SCRIPT.split("\n", 1)[1].replace(
        "forward()", "from vlmquant.workflow.jobserver import forward\nforward()", 1))
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, jobserver.ENV: server[0], "JOB_VALUE": "v", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(script), "0"], cwd=work, env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and int(res.stdout.split()[1]) == os.getpid()  # not a fork of the server
    assert res.stderr.splitlines()[0] == ("job server: refused (another Python (/another/python)); the job runs in "
                                          "its own process")


def test_signal_to_the_job_process_reaches_the_fork(tmp_path, server):
    res = job(tmp_path, server[0], "sleep")
    assert wait_for(lambda: (tmp_path / "work" / "started").exists())
    res.send_signal(signal.SIGTERM)
    out, _ = res.communicate(timeout=30)
    assert res.returncode == 128 + signal.SIGTERM
    assert wait_for(lambda: not alive(int(out.split()[0])))


def test_a_killed_job_process_takes_its_fork_along(tmp_path, server):
    res = job(tmp_path, server[0], "sleep")
    assert wait_for(lambda: (tmp_path / "work" / "started").exists())
    res.kill()
    out, _ = res.communicate(timeout=30)
    assert wait_for(lambda: not alive(int(out.split()[0])))


def test_the_server_ends_with_the_run_that_started_it(tmp_path):
    """A stand-in for Snakemake starts the server and a job, then dies by SIGKILL: server and fork go."""
    path = str(tmp_path / "jobs" / "socket")
    os.makedirs(os.path.dirname(path))
    run = textwrap.dedent(f"""\
        import os, subprocess, sys, time
        code = "from vlmquant.workflow import jobserver; jobserver.serve({path!r}, %d, ('torch',))" % os.getpid()
        server = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
        print(server.pid, flush=True)
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", run], stdout=subprocess.PIPE, text=True)
    server_pid = int(parent.stdout.readline())
    assert wait_for(lambda: os.path.exists(path))
    res = job(tmp_path, path, "sleep")
    assert wait_for(lambda: (tmp_path / "work" / "started").exists())
    parent.kill()
    parent.wait()
    out, _ = res.communicate(timeout=30)
    assert res.returncode != 0
    assert wait_for(lambda: not alive(int(out.split()[0])) and not alive(server_pid))
    assert not os.path.exists(os.path.dirname(path))


def test_cuda_loaded_reads_the_process_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f0 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1\n")
    assert not jobserver.cuda_loaded(str(maps))
    maps.write_text(maps.read_text() + "7f1 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libcuda.so.580.1\n")
    assert jobserver.cuda_loaded(str(maps))
    assert not jobserver.cuda_loaded()  # this CPU process has not loaded it
