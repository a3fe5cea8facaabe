"""Splash attention forward + backward compile with Mosaic for TPU v5e and v5p (libtpu, no TPU needed).

The step is traced on this CPU host and compiled for a TPU topology (REFERENCE.md section 6): the
`lax.platform_dependent` in jlora.attention.splash must pick the Mosaic kernel (three tpu_custom_calls:
forward, dq, dkv), and on a (data, fsdp, tensor) mesh set by `jax.set_mesh` the kernel must run per
device under shard_map (rows over fsdp, kv heads over tensor) with no all-gather of q, k or v.
Runs in a subprocess with JAX_PLATFORMS=cpu and ALLOW_MULTIPLE_LIBTPU_LOAD=1, like tests/kernels/test_tpu_compile.py.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

SCRIPT = r'''
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec as P
from jlora.attention import attend

def case(topology, mesh_shape, b, t, kv, g, d, window, cap):
    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    devices = np.array(topo.devices[:int(np.prod(mesh_shape))]).reshape(mesh_shape)
    mesh = jax.sharding.Mesh(devices, ("data", "fsdp", "tensor"))

    def step(q, k, v, seg, dout):
        f = lambda q, k, v: attend(q, k, v, seg, backend="splash", sliding_window=window, scale=d ** -0.5,
                                   logit_softcap=cap)
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(dout)

    heads = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))
    qs = jax.ShapeDtypeStruct((b, t, kv, g, d), jnp.bfloat16, sharding=heads)
    ks = jax.ShapeDtypeStruct((b, t, kv, d), jnp.bfloat16, sharding=heads)
    ss = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=NamedSharding(mesh, P(("data", "fsdp"))))
    with jax.set_mesh(mesh):
        compiled = jax.jit(step).lower(qs, ks, ks, ss, qs).compile()
    hlo = compiled.as_text()
    print(json.dumps(dict(topology=topology, mesh=mesh_shape, shape=[b, t, kv, g, d],
                          mosaic=hlo.count('custom_call_target="tpu_custom_call"'),
                          all_gather=hlo.count("all-gather"),
                          argument_bytes=compiled.memory_analysis().argument_size_in_bytes)), flush=True)

case("v5e:2x2", (1, 2, 2), 4, 4096, 4, 2, 128, 1024, 50.0)   # mesh, window, soft cap (Gemma 2 style)
case("v5p:2x2x1", (1, 1, 1), 1, 4096, 2, 4, 128, None, None)   # one chip, plain causal
'''


@pytest.mark.slow  # ~40 s on the shared 2-core box (two Mosaic compiles)
def test_splash_compiles_for_v5e_and_v5p():
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip('libtpu is not installed (pip install "jax[tpu]" at the installed jax version)')
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                          check=False, cwd="/")
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 2, f"rc={proc.returncode}:\n{proc.stderr[-3000:]}"
    for r in results:
        assert r["mosaic"] == 3, r       # forward, dq, dkv kernels: the Mosaic branch was chosen
        assert r["all_gather"] == 0, r   # per device under shard_map, nothing replicated
        b, t, kv, g, d = r["shape"]
        data, fsdp, tensor = r["mesh"]
        # q and dout [b, t, kv, g, d], k and v [b, t, kv, d] in bf16 (rows and heads split), int32 segment ids (rows)
        rows = data * fsdp
        per_device = (2 * b * t * kv * g * d + 2 * b * t * kv * d) * 2 // (rows * tensor) + 4 * b * t // rows
        assert r["argument_bytes"] <= per_device + 4096, r
