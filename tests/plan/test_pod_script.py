"""examples/tpu_pod_train.sh: one gcloud command that runs `jlora train` on every worker (checked with DRY_RUN)."""
import os
import shlex
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "examples" / "tpu_pod_train.sh"
OURS = ("TPU_NAME", "ZONE", "PROJECT", "SETUP", "JLORA_PIP")


def _run(*args, **env):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={**{k: v for k, v in os.environ.items() if k not in OURS}, "DRY_RUN": "1", **env})


def test_dry_run_prints_one_command_for_all_workers():
    done = _run("--model", "/mnt/shared/llama 8b", "--out", "/mnt/shared/runs/r16", "--mesh", "fsdp=16",
                TPU_NAME="my-v5e-16", ZONE="us-west4-a", PROJECT="proj")
    assert done.returncode == 0, done.stderr
    argv = shlex.split(done.stdout)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v5e-16"]
    assert "--worker=all" in argv and "--zone=us-west4-a" in argv and "--project=proj" in argv
    remote = next(a for a in argv if a.startswith("--command=")).removeprefix("--command=")
    assert "JLORA_DISTRIBUTED=1" in remote and "pip install" not in remote
    # The remote shell gets the trainer's arguments back intact, the space in the path included.
    train = shlex.split(remote.split("python3 -m jlora.cli train", 1)[1])
    assert train == ["--model", "/mnt/shared/llama 8b", "--out", "/mnt/shared/runs/r16", "--mesh", "fsdp=16"]


def test_setup_installs_first():
    done = _run("--out", "/mnt/x", TPU_NAME="t", ZONE="z", SETUP="1", JLORA_PIP="/mnt/shared/jlora.whl")
    remote = next(a for a in shlex.split(done.stdout) if a.startswith("--command="))
    assert remote.index("pip install") < remote.index("jlora.cli train") and "/mnt/shared/jlora.whl" in remote


def test_missing_tpu_name_is_an_error():
    done = _run("--out", "/mnt/x", ZONE="z")
    assert done.returncode != 0 and "TPU_NAME" in done.stderr
