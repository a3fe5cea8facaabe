"""Fixtures for the training tests."""
import itertools
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def run_until_checkpoint(tmp_path_factory):
    """run_until_checkpoint(commands, envs, checkpoint_dir) -> [(returncode, stdout, stderr)].

    Starts one process per command and SIGKILLs them all from outside as soon as `checkpoint_dir` exists
    (orbax renames a step directory into place only once it is complete), as a crash or a preemption would.
    """
    logs_dir = tmp_path_factory.mktemp("killed-runs")
    counter = itertools.count()

    def run(commands, envs, checkpoint_dir, timeout=600):
        logs = [(logs_dir / f"{n}.out", logs_dir / f"{n}.err") for n in itertools.islice(counter, len(commands))]
        procs = [subprocess.Popen(cmd, env=env, stdout=open(o, "w"), stderr=open(e, "w"), text=True)
                 for cmd, env, (o, e) in zip(commands, envs, logs)]
        deadline = time.monotonic() + timeout
        try:
            while not Path(checkpoint_dir).is_dir():
                if all(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                    break
                time.sleep(0.002)
        finally:
            for p in procs:
                if p.poll() is None:
                    os.kill(p.pid, signal.SIGKILL)
            for p in procs:
                p.wait()
        return [(p.returncode, Path(o).read_text(), Path(e).read_text()) for p, (o, e) in zip(procs, logs)]

    return run
