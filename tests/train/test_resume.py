"""A run killed with SIGKILL after a checkpoint resumes with bit-equal per-step losses."""
import json
import os
import signal
import subprocess
import sys

ARGS = ["--steps", "12", "--save-every", "4", "--batch-size", "4", "--grad-accum", "2", "--seq-len", "48",
        "--eval-every", "0", "--lora-dropout", "0.1", "--no-progress"]


def _train(out, *extra, env=None):
    cmd = [sys.executable, "-m", "jlora.cli", "train", "--out", str(out), *ARGS, *extra]
    return subprocess.run(cmd, env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
                          capture_output=True, text=True, timeout=600)


def _losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    full = _train(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]

    killed = _train(tmp_path / "killed", env={"JLORA_KILL_AFTER_SAVE": "8"})
    assert killed.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "8"]
    assert not (tmp_path / "killed" / "adapter").exists()

    resumed = _train(tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "at step 8" in resumed.stdout
    want, got = _losses(tmp_path / "full"), _losses(tmp_path / "killed")
    assert list(got) == list(range(1, 13))
    assert got == want  # bit-equal floats, dropout on
