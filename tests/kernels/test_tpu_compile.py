"""The Pallas forward and backward compile with Mosaic for real TPU generations.

Both kernels: lora_linear and nf4_lora_linear (cases prefixed "nf4:").

No TPU needed: libtpu (``pip install "jax[tpu]==<jax version>"``) provides
topology descriptions to lower and compile against. The compiles run in one
subprocess (jlora.kernels.tpu_compile) with JAX_PLATFORMS=cpu and
ALLOW_MULTIPLE_LIBTPU_LOAD=1, so this process's backends and other processes
holding /tmp/libtpu_lockfile do not matter. conftest.py starts that process as
soon as collection ends, so it runs beside the other tests. Skipped when
libtpu is absent.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from jlora.kernels.tpu_compile import TOPOLOGIES

# bf16 with the generation's table blocks and a ragged last row block (1032 =
# 2 * 512 + 8), and a rank-1 float32 case. For NF4 the bf16 case spans three
# row blocks (the weight-stationary VMEM cache is on) and the float32 case is
# decode-sized (one row block, no cache). Real sizes (8192 x 4096 x 14336) also
# compile but take ~5-15 s each: run `python -m jlora.kernels.tpu_compile
# v5e:2x2 bfloat16:8192x4096x14336r16 nf4:bfloat16:8192x4096x14336r16` by hand.
CASES = ("bfloat16:1032x1024x2048r16", "float32:136x512x1024r1",
         "nf4:bfloat16:1032x1024x2048r16", "nf4:float32:8x512x1024r1")


_PROC = None


def start_compiles():
    """Starts the compile subprocess (called by conftest.py after collection)."""
    global _PROC  # pylint: disable=global-statement
    if _PROC is None and importlib.util.find_spec("libtpu") is not None:
        env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
        _PROC = subprocess.Popen(  # pylint: disable=consider-using-with
            [sys.executable, "-m", "jlora.kernels.tpu_compile",
             ",".join(TOPOLOGIES.values()), *CASES],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return _PROC


@pytest.fixture(scope="module")
def compiled():
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip('libtpu is not installed (pip install "jax[tpu]" at the '
                    "installed jax version)")
    proc = start_compiles()
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    results = [json.loads(line) for line in stdout.splitlines()
               if line.startswith("{")]
    if not results:
        pytest.fail(f"tpu_compile printed nothing (rc={proc.returncode}):\n"
                    f"{stderr[-3000:]}")
    return results


@pytest.mark.parametrize("generation", sorted(TOPOLOGIES))
def test_compiles_forward_and_backward(compiled, generation):
    results = [r for r in compiled if r["topology"] == TOPOLOGIES[generation]]
    assert len(results) == len(CASES)
    for result in results:
        assert result["ok"], result.get("error")
        # One Mosaic kernel for y, one for dx; dA and dB are small XLA dots
        # (and for NF4 no dequantized W: the kernels read the packed codes).
        assert result["mosaic_kernels"] == 2, result
        m, k, n = result["shape"][:3]
        # Forward + dx are 4*M*K*N; a dW product would push it past 6*M*K*N.
        assert 4 * m * k * n <= result["flops"] < 5 * m * k * n, result
