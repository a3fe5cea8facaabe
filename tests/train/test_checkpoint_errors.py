"""Checkpoint save/restore failures are one line naming the step directory and what differs (not orbax's logs)."""
import subprocess
import sys
import textwrap

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


def test_a_failed_write_is_one_line(tmp_path):
    """A real write failure through orbax/tensorstore: the file-size limit makes every large write fail
    (EFBIG), as a full disk fails with ENOSPC; orbax would log each writer thread's traceback."""
    script = textwrap.dedent(f"""
        import resource, signal
        import jax
        from jlora.train.checkpoints import Checkpoints
        ckpt = Checkpoints({str(tmp_path / "checkpoints")!r})
        state = {{"params": {{"a": jax.random.normal(jax.random.key(0), (256, 256))}}, "opt_state": {{}}}}
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            ckpt.save(1, state, {{}})
        except Exception as e:
            print(type(e).__name__, e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.stdout.splitlines() == [
        f"CheckpointError {tmp_path / 'checkpoints' / '1'}: could not write the checkpoint (File too large "
        "(errno 27)); the previous checkpoint is kept"], out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
