"""What the workflow says through Snakemake: a config error as one line on stderr at its file and line, the
notes once, and a run stopped by SIGTERM said to be stopped, not failed (the messages themselves:
tests/test_config_messages.py)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import Workdir, snakemake_env

pytestmark = pytest.mark.slow


@pytest.fixture
def bare(tmp_path):
    """A workdir with the default config and nothing built (a dry run needs no demo)."""
    return Workdir(tmp_path, None)


def test_config_error_is_one_line_on_stderr_naming_file_and_line(bare):
    path = bare.file("config.yaml")
    lines = path.read_text().splitlines()
    n = next(i for i, line in enumerate(lines) if line.strip() == "n_samples: 8")
    lines[n] = lines[n].replace("n_samples", "n_sample")
    path.write_text("\n".join(lines) + "\n")
    res = bare.snakemake("-n", check=False)
    assert res.returncode == 1
    assert res.stderr == f"config.yaml: line {n + 1}: calib.demo.n_sample: unknown key (did you mean n_samples?)\n"
    assert "Traceback" not in res.stdout and "common.smk" not in res.stdout


def test_configfile_error_and_notes_through_snakemake(bare):
    bare.file("extra.yaml").write_text('runs:\n  "my run/w4": {method: rtn, w_bit: 4}\n')
    res = bare.snakemake("-n", "--configfile", "extra.yaml", check=False)
    assert res.returncode == 1
    assert res.stderr == ("extra.yaml: line 2: runs.my run/w4: names become folder names: use letters, digits and "
                          "- _ . only, starting with a letter or digit\n")
    bare.file("extra.yaml").write_text("runs:\n  rtn-w5: {method: rtn, w_bit: 5}\ntargets:\n  runs: [rtn-w5]\n")
    res = bare.snakemake("-n", "--configfile", "extra.yaml")
    notes = [line for line in res.stderr.splitlines() if line.startswith("note:")]
    assert notes == [line for line in notes if line.startswith("note: runs.rtn-w5: writes checkpoint/ (pseudo) only")]
    assert len(notes) == 1


def test_sigterm_says_what_was_stopped(workdir):
    """SIGTERM to Snakemake: the running jobs finish, no other starts; the run ends with one line saying so
    and exit status 143 (128 + 15), not Snakemake's "At least one job did not complete successfully"."""
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", "--cores", "1"], cwd=workdir.path, env=snakemake_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs, deadline = workdir.file("results/logs"), time.time() + 120
    while proc.poll() is None and time.time() < deadline and not any(logs.rglob("*.log")):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before a job started"
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM: no job failed; the running jobs finished, ")
    assert last.endswith("run the same command again to go on") and "summary 1" in last
    assert "did not complete successfully" not in out + err
