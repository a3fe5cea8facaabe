"""A checkpoint saved on one mesh resumes on another (and on one device) with the losses of an uninterrupted run.

Runs `jlora train` on the embedded default model in float32 with 8 virtual CPU devices: uninterrupted on
fsdp=8; killed after the step-4 checkpoint on fsdp=8; that run directory resumed on data=2,tensor=4 and,
copied, on a single device. The trainer restores the adapters and AdamW state into the shardings of the
new mesh (orbax reshards on read), so steps 5..8 must match the uninterrupted ones (rel <= 1e-6: the
meshes reduce in different orders, so the last bits may differ).
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

ARGS = ["--steps", "8", "--save-every", "4", "--batch-size", "8", "--seq-len", "32", "--dtype", "float32",
        "--eval-every", "0", "--lora-dropout", "0.1", "--warmup-steps", "2", "--no-progress"]
EIGHT = "--xla_force_host_platform_device_count=8"


def _train(out, *extra, devices=8, env=None):
    flags = os.environ.get("XLA_FLAGS", "").replace(EIGHT, "").strip()
    cmd = [sys.executable, "-m", "jlora.cli", "train", "--out", str(out), *ARGS, *extra]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"{flags} {EIGHT}" if devices == 8 else flags,
           **(env or {})}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    full = _train(root / "full", "--mesh", "fsdp=8")
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _train(root / "tensor", "--mesh", "fsdp=8", env={"JLORA_KILL_AFTER_SAVE": "4"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    shutil.copytree(root / "tensor", root / "single")
    return root, _losses(root / "full")


@pytest.mark.parametrize("name, mesh, devices", [("tensor", "data=2,tensor=4", 8), ("single", None, 1)])
def test_resume_on_another_mesh_continues_the_same_losses(runs, name, mesh, devices):
    root, want = runs
    resumed = _train(root / name, "--resume", *(["--mesh", mesh] if mesh else []), devices=devices)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout, resumed.stdout[-2000:]
    got = _losses(root / name)
    assert list(got) == list(range(1, 9))
    for step in range(1, 9):
        rel = abs(got[step] - want[step]) / abs(want[step])
        assert rel <= 1e-6, (name, step, got[step], want[step])
    assert got[8] != got[4]  # training moved on after the resume
