"""Compile the Pallas LoRA forward + backward for a TPU topology, without a TPU.

With ``jax[tpu]`` (libtpu) installed at jax's version,
``jax.experimental.topologies.get_topology_desc`` returns devices of a real TPU
generation; lowering and ``.compile()`` against one runs Mosaic on the kernels.
Run it as a separate process, so libtpu is loaded under a known environment::

  JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 \\
    python -m jlora.kernels.tpu_compile v5e:2x2 bfloat16:520x1024x2048r16

``JAX_PLATFORMS=cpu`` keeps libtpu from probing for local TPU chips, and
``ALLOW_MULTIPLE_LIBTPU_LOAD=1`` lets several processes load libtpu at once
(otherwise the second one fails on /tmp/libtpu_lockfile). Prints one JSON line
per case: topology, device kind, dtype, shape, block sizes, whether it compiled,
the number of Mosaic kernels in the compiled HLO, and memory/cost figures.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp

from jlora.kernels.block_sizes import BlockSizes
from jlora.kernels.lora_linear import lora_linear

# Topology names that libtpu 0.0.42 (jax 0.10.2) accepts for one host.
TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1",
              "v6e": "v6e:2x2"}


def compile_case(topology_name: str, dtype, m: int, k: int, n: int, r: int,
                 block_sizes: BlockSizes | None = None) -> dict:
    """AOT-compiles one jitted forward + vjp of ``lora_linear(impl="pallas")``."""
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    topo = topologies.get_topology_desc(platform="tpu",
                                        topology_name=topology_name)
    device = topo.devices[0]
    if block_sizes is None:
        block_sizes = BlockSizes.get_default(device.device_kind).fit(m, k, n)
    sharding = jax.sharding.SingleDeviceSharding(device)
    dtype = jnp.dtype(dtype)

    def spec(shape, dt):
        return jax.ShapeDtypeStruct(shape, dt, sharding=sharding)

    def train_step(x, w, a, b, dy):
        fn = lambda x, a, b: lora_linear(x, w, a, b, scale=2.0, impl="pallas",
                                         block_sizes=block_sizes)
        y, vjp = jax.vjp(fn, x, a, b)
        return y, vjp(dy)

    result = dict(topology=topology_name, device_kind=device.device_kind,
                  dtype=dtype.name, shape=[m, k, n, r],
                  block_sizes=dataclasses.asdict(block_sizes))
    try:
        compiled = jax.jit(train_step).lower(
            spec((m, k), dtype), spec((k, n), dtype), spec((k, r), jnp.float32),
            spec((r, n), jnp.float32), spec((m, n), dtype)).compile()
    except Exception as e:  # pylint: disable=broad-except
        return dict(result, ok=False, error=f"{type(e).__name__}: {e}"[:2000])
    hlo = compiled.as_text()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return dict(
        result, ok=True,
        mosaic_kernels=hlo.count('custom_call_target="tpu_custom_call"'),
        temp_bytes=getattr(memory, "temp_size_in_bytes", None),
        flops=(cost or {}).get("flops"))


def _parse_case(text: str):
    """'bfloat16:520x1024x2048r16' -> (dtype, m, k, n, r)."""
    dtype, dims = text.split(":")
    mkn, r = dims.split("r")
    m, k, n = (int(v) for v in mkn.split("x"))
    return dtype, m, k, n, int(r)


def main(argv: list[str]) -> None:
    topology_names, *cases = argv
    for name in topology_names.split(","):
        for case in cases:
            print(json.dumps(compile_case(name, *_parse_case(case))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
