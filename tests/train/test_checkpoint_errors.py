"""Checkpoint save/restore failures are one line naming the step directory and what differs (not orbax's logs)."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from jlora.convert.safetensors_io import CheckpointError
from jlora.train.checkpoints import Checkpoints


def _state(r: int, module: str = "q_proj"):
    return {"params": {"layers": {module: {"lora_A": jnp.ones((8, r)), "lora_B": jnp.zeros((r, 8))}}},
            "opt_state": ({"mu": {module: jnp.zeros((8, r))}},)}


@pytest.fixture
def saved(tmp_path):
    ckpt = Checkpoints(tmp_path / "checkpoints")
    ckpt.save(3, _state(4), {"data": 0})
    ckpt.close()
    return tmp_path / "checkpoints"


def test_restore_with_another_rank_names_the_array_and_both_shapes(saved, capfd):
    ckpt = Checkpoints(saved)
    with pytest.raises(CheckpointError) as e:
        ckpt.restore(3, _state(8))
    message = str(e.value)
    assert message.splitlines() == [message]
    assert message.startswith(f"{saved.resolve() / '3'}: params.layers.q_proj.lora_A has shape (8, 4) in the "
                              "checkpoint, this run needs (8, 8)")
    assert "Traceback" not in capfd.readouterr().err


def test_restore_with_other_targets_names_the_array(saved):
    with pytest.raises(CheckpointError, match=r"the checkpoint holds params\.layers\.q_proj\.lora_A, which this run "
                                              r"does not train"):
        Checkpoints(saved).restore(3, _state(4, "v_proj"))


def test_restore_with_the_same_settings_still_works(saved):
    state, meta = Checkpoints(saved).restore(3, _state(4))
    assert meta == {"data": 0} and state["params"]["layers"]["q_proj"]["lora_A"].shape == (8, 4)


def test_a_failed_write_is_one_line(default_base, tmp_path):
    """A real write failure through orbax/tensorstore in `jlora train`: a file-size limit makes the
    checkpoint's writes fail (EFBIG) as a full disk does (ENOSPC). orbax logged every writer thread's
    traceback, then asyncio every orphaned write task and the closed event loop every late callback."""
    import json

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": f"{i + 1}"}) + "\n" for i in range(8)))
    out = tmp_path / "run"

    # 40 KiB per file: run_config.json and metrics fit, the checkpoint's arrays do not
    cmd = ["bash", "-c", 'ulimit -f 40 && exec "$@"', "bash", sys.executable, "-m", "jlora.cli", "train", "--model", str(default_base), "--data", str(data),
           "--out", str(out), "--steps", "2", "--save-every", "1", "--batch-size", "2", "--seq-len", "32",
           "--eval-every", "0", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr
    ours = [line for line in proc.stderr.splitlines() if line.startswith("jlora")]
    assert ours == [f"jlora train: error: {out / 'checkpoints' / '1'}: could not write the checkpoint (File too "
                    "large (errno 27)); the previous checkpoint is kept"], proc.stderr
    for noise in ("Traceback", "Event loop is closed", "was never retrieved", "OUT_OF_RANGE"):
        assert noise not in proc.stderr, proc.stderr
