"""The Pallas forward and backward compile with Mosaic for real TPU generations.

No TPU needed: libtpu (``pip install "jax[tpu]==<jax version>"``) provides
topology descriptions to lower and compile against. The compiles run in one
subprocess (jlora.kernels.tpu_compile) with JAX_PLATFORMS=cpu and
ALLOW_MULTIPLE_LIBTPU_LOAD=1, so this process's backends and other processes
holding /tmp/libtpu_lockfile do not matter. Skipped when libtpu is absent.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from jlora.kernels.tpu_compile import TOPOLOGIES

# bf16 with the generation's table blocks and a ragged last row block (1032 =
# 2 * 512 + 8), and a rank-1 float32 case. Real sizes (8192 x 4096 x 14336) also
# compile but take ~5-15 s each: run `python -m jlora.kernels.tpu_compile
# v5e:2x2 bfloat16:8192x4096x14336r16` by hand.
CASES = ("bfloat16:1032x1024x2048r16", "float32:136x512x1024r1")


@pytest.fixture(scope="module")
def compiled():
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip('libtpu is not installed (pip install "jax[tpu]" at the '
                    "installed jax version)")
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    proc = subprocess.run(
        [sys.executable, "-m", "jlora.kernels.tpu_compile",
         ",".join(TOPOLOGIES.values()), *CASES],
        env=env, capture_output=True, text=True, timeout=600, check=False)
    results = [json.loads(line) for line in proc.stdout.splitlines()
               if line.startswith("{")]
    if not results:
        pytest.fail(f"tpu_compile printed nothing (rc={proc.returncode}):\n"
                    f"{proc.stderr[-3000:]}")
    return results


@pytest.mark.parametrize("generation", sorted(TOPOLOGIES))
def test_compiles_forward_and_backward(compiled, generation):
    results = [r for r in compiled if r["topology"] == TOPOLOGIES[generation]]
    assert len(results) == len(CASES)
    for result in results:
        assert result["ok"], result.get("error")
        # One Mosaic kernel for y, one for dx; dA and dB are small XLA dots.
        assert result["mosaic_kernels"] == 2, result
        m, k, n = result["shape"][:3]
        # Forward + dx are 4*M*K*N; a dW product would push it past 6*M*K*N.
        assert 4 * m * k * n <= result["flops"] < 5 * m * k * n, result
