"""`jlora train --sample-every` on two hosts (jlora/train/samples.py, jlora/generate/decode.py): two CPU processes
of 4 devices each, joined by jax.distributed, sample together (every process runs the same jitted prefill and
decode calls on the params sharded over both) and process 0 writes samples.jsonl.

The reference is one process of 8 devices on the same mesh (fsdp=8), whose params agree with the two hosts' to
float32 rounding (tests/train/test_multihost.py): the greedy answers must be the same strings at every sampled
step. Killed after step 3's checkpoint (its later checkpoint and adapter gone, a stale line after it in the
file) and resumed on the two hosts, the run's samples.jsonl equals the uninterrupted one's. A resumed
non-writing process reads the steps process 0 kept without writing the file itself.
"""
import json
import shutil

import pytest

from jlora.train import samples
from tests.train.test_multihost import _env, _host_envs

import subprocess
import sys

ARGS = ["--steps", "6", "--batch-size", "8", "--seq-len", "32", "--dtype", "float32", "--eval-every", "0",
        "--save-every", "3", "--warmup-steps", "1", "--lr", "3e-3", "--sample-every", "3", "--no-progress",
        "--mesh", "fsdp=8"]
PROMPTS = [{"prompt": "The quick brown fox"}, {"prompt": "Once upon a time there"},
           {"messages": [{"role": "user", "content": "Name a colour."}]}]


def _command(out, prompts, *extra):
    return [sys.executable, "-m", "jlora.cli", "train", "--out", str(out), *ARGS, "--sample-prompts", str(prompts),
            *extra]


def _two_hosts(out, prompts, *extra):
    """Runs the command on two processes of 4 devices each; [(stdout, stderr)] per process, both exited 0."""
    procs = [subprocess.Popen(_command(out, prompts, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for env in _host_envs()]
    try:
        results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (rc, _, stderr) in enumerate(results):
        assert rc == 0, f"process {i}: rc={rc}\n{stderr[-3000:]}"
    return [(stdout, stderr) for _, stdout, stderr in results]


def _samples(out):
    return [json.loads(line) for line in (out / samples.FILE).read_text().splitlines()]


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


@pytest.mark.slow  # five processes of 4-8 virtual devices, ~2 min on 2 cores
def test_two_hosts_sample_like_one_and_resume(tmp_path, prompts):
    one = subprocess.run(_command(tmp_path / "one", prompts), env=_env(8), capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    results = _two_hosts(tmp_path / "two", prompts)
    want, got = _samples(tmp_path / "one"), _samples(tmp_path / "two")
    assert [(r["step"], r["prompt"]) for r in got] == [(s, p.get("prompt", p.get("messages")))
                                                       for s in (0, 3, 6) for p in PROMPTS]
    assert [r["answer"] for r in got] == [r["answer"] for r in want]
    assert [r["answer"] for r in got if r["step"] == 0] != [r["answer"] for r in got if r["step"] == 6]
    assert "samples (" in results[0][0] and "samples (" not in results[1][0]  # process 0 prints before/after

    killed = tmp_path / "killed"  # as if killed after step 3's checkpoint, before step 6's lines were complete
    shutil.copytree(tmp_path / "two", killed)
    shutil.rmtree(killed / "checkpoints" / "6")
    shutil.rmtree(killed / "adapter")
    with open(killed / samples.FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 6, "prompt": "stale", "answer": "x"}) + "\n")
    resumed = _two_hosts(killed, prompts, "--resume")
    assert any("at step 3" in out + err for out, err in resumed), "the run must resume from step 3's checkpoint"
    assert (killed / samples.FILE).read_text() == (tmp_path / "two" / samples.FILE).read_text()


def test_a_process_that_does_not_write_reads_the_kept_steps(tmp_path):
    lines = [{"step": n, "prompt": "p", "answer": a} for n, a in ((0, "a"), (2, "b"))]
    path = tmp_path / samples.FILE
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))  # as process 0 left it, cut back to step 2
    stamp = path.stat().st_mtime_ns, path.stat().st_ino
    other = samples.Samples(tmp_path, [samples.Prompt("p", False)], every=2, last_step=5, resume_from=2,
                            write=False)
    assert other.done == {0, 2} and other.records() == lines and not other.due(2) and other.due(4)
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == stamp  # read, not rewritten
