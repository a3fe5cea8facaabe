"""Splash block sizes per TPU generation (jlora.attention.splash.GENERATION_BLOCKS, from MaxText's tuned runs):
chosen for long rows on v5e, v5p and v6e, and each compiles (forward + backward, Mosaic) for its generation
under libtpu's default scoped VMEM limit (libtpu, no TPU needed; slow). MaxText's own 2048-token blocks need a
raised limit (the module's comment), which jlora does not set."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from jlora.attention.splash import DEFAULT_BLOCK, GENERATION_BLOCKS, LONG_ROW, splash_block_sizes


def test_generation_blocks_for_long_rows_only():
    for generation, blocks in GENERATION_BLOCKS.items():
        chosen = splash_block_sizes(LONG_ROW, None, generation)
        assert all(getattr(chosen, k) == v for k, v in blocks.items()), generation
        assert splash_block_sizes(LONG_ROW - 128, None, generation).block_q == DEFAULT_BLOCK
    assert splash_block_sizes(4 * LONG_ROW, None, None).block_q == DEFAULT_BLOCK  # unknown generation (CPU)
    assert splash_block_sizes(4 * LONG_ROW, None, "v4").block_q == DEFAULT_BLOCK


SCRIPT = r'''
import json
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import topologies
from jlora.attention import attend
from jlora.attention.splash import tpu_generation

for topology in ("v5e:2x2", "v5p:2x2x1", "v6e:2x2"):
    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    mesh = jax.sharding.Mesh(np.array(topo.devices[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    b, t, kv, g, d = 1, 8192, 2, 2, 128

    def step(q, k, v, seg, dout):
        out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, seg, backend="splash", scale=d ** -0.5), q, k, v)
        return out, vjp(dout)

    s = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    qs = jax.ShapeDtypeStruct((b, t, kv, g, d), jnp.bfloat16, sharding=s)
    ks = jax.ShapeDtypeStruct((b, t, kv, d), jnp.bfloat16, sharding=s)
    with jax.set_mesh(mesh):
        generation = tpu_generation(mesh)
        compiled = jax.jit(step).lower(qs, ks, ks, jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=s), qs).compile()
    print(json.dumps(dict(topology=topology, generation=generation,
                          mosaic=compiled.as_text().count('custom_call_target="tpu_custom_call"'))), flush=True)
'''


@pytest.mark.slow  # three Mosaic compiles at T 8192 (~1 min idle)
def test_generation_blocks_compile_for_v5e_v5p_v6e():
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip('libtpu is not installed (pip install "jax[tpu]" at the installed jax version)')
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1", TPU_WORKER_HOSTNAMES="localhost")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=1500,
                          check=False, cwd="/")
    rows = {r["topology"]: r for r in map(json.loads, filter(lambda l: l.startswith("{"), proc.stdout.splitlines()))}
    assert len(rows) == 3, f"rc={proc.returncode}:\n{proc.stderr[-3000:]}"
    assert [rows[t]["generation"] for t in ("v5e:2x2", "v5p:2x2x1", "v6e:2x2")] == ["v5e", "v5p", "v6e"]
    for r in rows.values():
        assert r["mosaic"] == 3, r  # forward, dq, dkv: the Mosaic kernels, compiled
