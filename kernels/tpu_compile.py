"""Compile the Pallas LoRA forward + backward for a TPU topology, without a TPU.

With ``jax[tpu]`` (libtpu) installed at jax's version,
``jax.experimental.topologies.get_topology_desc`` returns devices of a real TPU
generation; lowering and ``.compile()`` against one runs Mosaic on the kernels.
Run it as a separate process, so libtpu is loaded under a known environment::

  JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 \\
    python -m jlora.kernels.tpu_compile v5e:2x2 bfloat16:520x1024x2048r16 \\
    nf4:bfloat16:1032x4096x4096r16

A case prefixed ``nf4:`` compiles ``nf4_lora_linear`` (NF4 weight [N, K],
blocksize 64, double quantization) instead of ``lora_linear``.

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
from jlora.kernels.nf4_lora_linear import nf4_lora_linear
from jlora.nf4 import quantize

# Topology names that libtpu 0.0.42 (jax 0.10.2) accepts for one host.
TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1",
              "v6e": "v6e:2x2"}


def compile_case(topology_name: str, dtype, m: int, k: int, n: int, r: int,
                 block_sizes: BlockSizes | None = None, nf4: bool = False,
                 blocksize: int = 64) -> dict:
    """AOT-compiles one jitted forward + vjp of ``lora_linear(impl="pallas")``.

    With ``nf4``, of ``nf4_lora_linear(impl="pallas")`` on an abstract
    double-quantized NF4Tensor of shape (N, K) (``jax.eval_shape`` of
    ``jlora.nf4.quantize``).
    """
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    topo = topologies.get_topology_desc(platform="tpu",
                                        topology_name=topology_name)
    device = topo.devices[0]
    dtype = jnp.dtype(dtype)
    if block_sizes is None:
        defaults = BlockSizes.get_default(device.device_kind)
        block_sizes = (defaults.fit_nf4(m, k, n, blocksize=blocksize,
                                        itemsize=dtype.itemsize)
                       if nf4 else defaults.fit(m, k, n))
    sharding = jax.sharding.SingleDeviceSharding(device)

    def spec(shape, dt):
        return jax.ShapeDtypeStruct(shape, dt, sharding=sharding)

    def train_step(x, w, a, b, dy):
        fn = lambda x, a, b: lora_linear(x, w, a, b, scale=2.0, impl="pallas",
                                         block_sizes=block_sizes)
        y, vjp = jax.vjp(fn, x, a, b)
        return y, vjp(dy)

    def nf4_train_step(x, w_nf4, a, b, dy):
        fn = lambda x, a, b: nf4_lora_linear(x, w_nf4, a, b, scale=2.0,
                                             impl="pallas",
                                             block_sizes=block_sizes)
        y, vjp = jax.vjp(fn, x, a, b)
        return y, vjp(dy)

    result = dict(topology=topology_name, device_kind=device.device_kind,
                  kernel="nf4_lora_linear" if nf4 else "lora_linear",
                  dtype=dtype.name, shape=[m, k, n, r],
                  block_sizes=dataclasses.asdict(block_sizes))
    if nf4:
        abstract = jax.eval_shape(
            lambda w: quantize(w, blocksize=blocksize, double_quant=True),
            jax.ShapeDtypeStruct((n, k), jnp.bfloat16))
        weight = jax.tree.map(lambda v: spec(v.shape, v.dtype), abstract)
        step = nf4_train_step
    else:
        weight = spec((k, n), dtype)
        step = train_step
    try:
        compiled = jax.jit(step).lower(
            spec((m, k), dtype), weight, spec((k, r), jnp.float32),
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
    """'[nf4:]bfloat16:520x1024x2048r16' -> ((dtype, m, k, n, r), nf4)."""
    nf4 = text.startswith("nf4:")
    dtype, dims = text.removeprefix("nf4:").split(":")
    mkn, r = dims.split("r")
    m, k, n = (int(v) for v in mkn.split("x"))
    return (dtype, m, k, n, int(r)), nf4


def main(argv: list[str]) -> None:
    topology_names, *cases = argv
    for name in topology_names.split(","):
        for case in cases:
            args, nf4 = _parse_case(case)
            print(json.dumps(compile_case(name, *args, nf4=nf4)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
