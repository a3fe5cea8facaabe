"""The fused LoRA kernels on a device mesh: one kernel call per device under `shard_map`.

XLA partitions plain dots by itself, but a Pallas (Mosaic) or Triton kernel is an opaque custom call:
it must be told what each device holds. With the placement of jlora.mesh_axes (the trainer's) each
device runs the kernel on its rows and, with `tensor` > 1, its slice of the projection:

    column-parallel (q, k, v, gate, up):  y[:, Nt] = x W[:, Nt] + s (x A) B[:, Nt]
    row-parallel (o, down):               y = psum_t( x[:, Kt] W[Kt, :] + s (x[:, Kt] A[Kt, :]) B )

Both are exact: the product is linear in each K slice, so the partial outputs (low-rank term included)
sum to the full one. Rows (the batch axis) split over (data, fsdp); the weights arrive gathered over
fsdp (shard_map's input resharding is FSDP's all-gather), and shard_map's transpose sums the adapter
gradients over the axes they are replicated on.

NF4 weights ([N, K] flat codes, bitsandbytes layout) slice by output rows only: column-parallel
projections take their N/t rows of codes when the blocks (and nested blocks) tile them; otherwise,
and for the row-parallel ones, each device dequantizes the whole weight and computes y[:, Nt] or
all of y (correct, t times the work on o/down).
"""
from __future__ import annotations

import dataclasses

import jax
from jax.sharding import Mesh, PartitionSpec as P

from jlora.mesh_axes import ROW_AXES
from jlora.nf4 import NF4Tensor


def _divides(mesh: Mesh, axis, dim: int):
    return axis if axis is not None and dim % mesh.shape[axis] == 0 else None


def _nf4_row_split(q: NF4Tensor, t: int) -> bool:
    """Whether q's flat arrays cut into t contiguous runs of whole output rows (and whole nested blocks)."""
    n, k = q.shape
    blocks = q.size // q.blocksize
    return (n % t == 0 and k % q.blocksize == 0 and q.size % 2 == 0
            and (not q.double_quant or (blocks // t) % q.nested_blocksize == 0))


def sharded_lora_linear(op, x, w, a, b, *, scale: float, impl: str, mesh: Mesh, row_parallel: bool):
    """op(x, w, a, b, scale=scale, impl=impl) run per device over `mesh` (see the module docstring).

    x [B, ..., K] with its rows on axis 0; w dense [K, N] or an NF4Tensor [N, K]; returns y [B, ..., N].
    """
    rows = ROW_AXES if x.shape[0] % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0 else None
    mid = (None,) * (x.ndim - 2)
    t = mesh.shape["tensor"]
    nf4 = isinstance(w, NF4Tensor)
    k, n = (w.shape[1], w.shape[0]) if nf4 else w.shape
    k_axis = _divides(mesh, "tensor", k) if row_parallel and not nf4 else None
    if row_parallel:
        n_axis = None
    elif nf4:
        n_axis = "tensor" if t > 1 and _nf4_row_split(w, t) else None
    else:
        n_axis = _divides(mesh, "tensor", n)
    if nf4:
        flat = P(n_axis)
        w_spec = dataclasses.replace(w, codes=flat, absmax=flat, nested_absmax=flat if w.double_quant else P(),
                                     offset=P(), nested_code=P())
        local_shape = (n // t, k) if n_axis else (n, k)
    else:
        w_spec = P(k_axis, n_axis)
    in_specs = (P(rows, *mid, k_axis), w_spec, P(k_axis, None), P(None, n_axis))
    out_spec = P(rows, *mid, n_axis)

    def per_device(x, w, a, b):
        if nf4:
            w = dataclasses.replace(w, shape=local_shape)
        y = op(x, w, a, b, scale=scale, impl=impl)
        return jax.lax.psum(y, "tensor") if k_axis else y

    return jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=out_spec,
                         check_vma=False)(x, w, a, b)
