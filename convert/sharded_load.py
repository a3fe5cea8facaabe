"""Loading a checkpoint straight onto a device mesh: every array is created shard by shard from the file.

    model = jlora.load_hf("path/to/llama", mesh=make_mesh("fsdp=8"))   # each device gets only its shard

For each tensor, `jax.make_array_from_callback(shape, sharding, read)` asks for the shards this
process's devices hold, and `read(index)` reads just that slice from the safetensors file
(`safe_open(...).get_slice(name)[rows, cols]`) and casts it; a torch [out, in] weight is created in its
stored orientation and each device transposes its own shard into the [in, out] kernel (a jitted
transpose between the two shardings: no communication). So a host reads only the byte ranges its own
devices hold, no device holds more than its shard (two, stored and transposed, of the tensor being
loaded), and the host holds its part of the model plus about one shard in flight (each file is opened
per tensor, so at most one tensor's pages of it are ever mapped). The shardings are the trainer's
(jlora.convert.mesh_rules), so placing the loaded model on the same mesh moves nothing; a mesh axis
that does not divide a tensor's dimension is a `MeshError` naming the tensor, its shape, the axis and
the mesh.

NF4 (jlora.nf4: blocks of `blocksize` consecutive values of the flattened torch [out, in] weight, codes
and absmax split over (fsdp, tensor) as contiguous runs):
- Quantizing while loading: when every device's run of the flat weight is whole blocks (no partial
  block, blocks a multiple of fsdp x tensor; `mesh_rules.nf4_splits`), each device receives its
  dense run and quantizes it where it lies (`shard_map`). Blocks are independent, so the codes and
  absmax equal the whole tensor's; double quantization needs `offset = mean(absmax)` over the whole
  tensor, so the float32 absmax (1/64 of the values) is all-gathered and the nested statistics are
  computed from it in full, in the same order as `nf4.quantize` (bit-identical). Otherwise the tensor
  falls back: it is read whole, quantized on the default device and placed replicated, as the trainer
  places such a weight (a warning names it). Real models (dimensions multiples of 64 x devices) split.
- A bitsandbytes 4-bit checkpoint: codes (`P.weight`, uint8) and absmax (`P.weight.absmax`) are read
  per device as byte runs of the same ranges, the small statistics whole; its quant state is checked
  first. A layout the fast path does not cover (another `bnb_4bit_quant_storage`, a weight that does
  not split) is read whole and checked by `nf4.from_bnb_tensors`, then placed.
"""
from __future__ import annotations

import functools
import json
import math
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors import safe_open

from jlora import nf4
from jlora.convert.hf_names import IGNORED, bnb_weight_name, tensor_map, variable_at
from jlora.convert.mesh_rules import NF4_AXES, checked_spec, nf4_shards, nf4_specs, nf4_splits
from jlora.convert.safetensors_io import CheckpointError, read_header
from jlora.nf4.bnb_layout import ABSMAX, NESTED_ABSMAX, NESTED_QUANT_MAP, QUANT_MAP, QUANT_STATE, WEIGHT
from jlora.nf4.double_quant import quantize_absmax
from jlora.nf4_weight import NF4Weight


class TensorReader:
    """Reads slices of one tensor of one safetensors file (opened until `close`); errors name both."""

    def __init__(self, path: Path, name: str):
        self.path, self.name = path, name
        self._file = self._call(lambda: safe_open(str(path), framework="numpy"))
        self._slice = self._call(lambda: self._file.get_slice(name))
        self.shape = tuple(self._slice.get_shape())
        self.dtype = self._slice.get_dtype()

    def _call(self, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - safetensors' own SafetensorError is no ValueError
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{self.path}: cannot read tensor {self.name}: {first}") from e

    def __getitem__(self, index) -> np.ndarray:
        return self._call(lambda: self._slice[index])

    def close(self):
        self._slice = self._file = None  # drops the mapping


def _key(index: tuple) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


def create(shape: tuple, sharding: NamedSharding, read) -> jax.Array:
    """The global array whose shard at `index` is `read(index)` (a host array), for this process's devices.

    Like `jax.make_array_from_callback`, but each distinct shard is read once (replicas along `data`
    share it) and handed to its devices before the next is read, so the host holds one shard at a time
    (make_array_from_callback gathers every device's host copy first)."""
    groups: dict = {}
    for device, index in sharding.addressable_devices_indices_map(tuple(shape)).items():
        groups.setdefault(_key(index), (index, []))[1].append(device)
    pieces = []
    for index, devices in groups.values():
        part = read(index)
        pieces += jax.block_until_ready([jax.device_put(part, d) for d in devices])
        del part
    return jax.make_array_from_single_device_arrays(tuple(shape), sharding, pieces)


def put(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array onto the mesh in `sharding` (each process gives its own devices their slices)."""
    array = np.asarray(array)
    return create(array.shape, sharding, lambda index: np.asarray(array[index]))


def flat_range(index: tuple, n: int) -> tuple[int, int]:
    start, stop, _ = index[0].indices(n)
    return start, stop


def read_flat(reader: TensorReader, start: int, stop: int) -> np.ndarray:
    """Elements [start, stop) of the row-major flattened 2-D (or [n, 1]) tensor, reading only the rows
    that hold them."""
    cols = reader.shape[1] if len(reader.shape) > 1 else 1
    r0, r1 = start // cols, -(-stop // cols)
    rows = reader[r0:r1].reshape(-1)
    return rows[start - r0 * cols:stop - r0 * cols]


def fill_sharded(model, config, files: list[Path], mesh: Mesh, *, quantize=None,
                 bnb_parts: dict[str, set[str]] | None = None, warn=warnings.warn, placed=None) -> None:
    """Places every tensor of the safetensors `files` into the abstract `model`, created per shard on
    `mesh` (see the module docstring). Same checks and errors as hf_checkpoint.fill_from_tensors:
    unknown, missing and misshapen tensors name the file and tensor.

    quantize: an NF4Config to quantize the decoder projections while loading, or None.
    bnb_parts: `P.weight` -> its tensor names, for projections stored in bitsandbytes' 4-bit layout.
    placed: called with each variable's model path once it holds its value (stacked.LayerStackBuilder:
      the stack is created in the rows' sharding with the layer axis whole, as mesh_rules places it).
    """
    placed = placed or (lambda path: None)
    expected = tensor_map(config)
    bnb_parts = bnb_parts or {}
    located: dict[str, Path] = {}
    for path in files:
        for name in read_header(path):  # also the truncation check, before anything is read
            located.setdefault(name, path)
    unknown = sorted(n for n in located if not (IGNORED.match(n) or n in expected or bnb_weight_name(n) in bnb_parts
                                                 or (n == "lm_head.weight" and config.tie_word_embeddings)))
    if unknown:
        raise CheckpointError(f"{files[0].parent}: tensors that are not part of a {config.model_type} model: "
                              f"{unknown[:20]}{' ...' if len(unknown) > 20 else ''}")
    missing = sorted(n for n in expected if n not in located)
    if missing:
        raise CheckpointError(f"{files[0].parent}: checkpoint lacks tensors the config requires: "
                              f"{missing[:20]}{' ...' if len(missing) > 20 else ''}")
    for name, entry in expected.items():
        var = variable_at(model, entry.path)
        flat_name = ".".join(str(p) for p in entry.path)
        if name in bnb_parts:
            q = _bnb_nf4(name, {n: located[n] for n in bnb_parts[name]}, entry.hf_shape(var.shape), mesh, warn)
            variable_at(model, entry.path[:-1]).kernel = NF4Weight(q)
            placed(entry.path)
            continue
        reader = TensorReader(located[name], name)
        try:
            want = entry.hf_shape(var.shape)
            if reader.shape != want:
                raise CheckpointError(f"{located[name]}: tensor {name} has shape {reader.shape}, "
                                      f"config.json implies {want}")
            if quantize is not None and entry.path[0] == "model" and entry.path[-1] == "kernel":
                q = _quantized(reader, jnp.dtype(var.dtype), mesh, quantize, warn)
                variable_at(model, entry.path[:-1]).kernel = NF4Weight(q)
            else:
                var.set_value(_dense(reader, flat_name, var, entry.transpose, mesh))
        finally:
            reader.close()
        placed(entry.path)


@functools.cache
def _transposer(sharding: NamedSharding):
    """jit(x.T) into `sharding`, from x sharded the transposed way: each device transposes its own shard
    (no communication; XLA's tiled transpose, where numpy's strided copy of a bfloat16 [out, in] slice
    took half the load time on CPU)."""
    return jax.jit(jnp.transpose, out_shardings=sharding)


def _dense(reader: TensorReader, flat_name: str, var, transpose: bool, mesh: Mesh) -> jax.Array:
    dtype = np.dtype(jnp.dtype(var.dtype))
    spec = checked_spec(flat_name, var.shape, mesh, tensor=reader.name)

    def read(index):
        return reader[index].astype(dtype, copy=False)

    sharding = NamedSharding(mesh, spec)
    if not transpose:
        return create(var.shape, sharding, read)
    stored = create(reader.shape, NamedSharding(mesh, P(*reversed(tuple(spec) + (None,) * (2 - len(spec))))), read)
    out = jax.block_until_ready(_transposer(sharding)(stored))  # one tensor in flight at a time
    stored.delete()
    return out


@functools.cache
def _shard_quantizer(mesh: Mesh, blocksize: int, double_quant: bool):
    """jit(shard_map): each device's dense run of the flat weight -> its NF4 codes and absmax; with
    double quantization the float32 absmax is gathered whole for `quantize_absmax`, and each device
    keeps its own run of the 8-bit absmax codes."""
    flat = P(NF4_AXES)

    def local(x):
        q = nf4.quantize(x.reshape(1, -1), blocksize=blocksize, double_quant=False)
        codes, absmax = q.codes, q.absmax
        if not double_quant:
            return codes, absmax, jnp.zeros((0,), jnp.float32), jnp.float32(0)
        whole = jax.lax.all_gather(absmax, NF4_AXES, tiled=True)
        absmax_codes, nested_absmax, offset = quantize_absmax(whole)
        start = jax.lax.axis_index(NF4_AXES) * absmax.shape[0]
        return codes, jax.lax.dynamic_slice_in_dim(absmax_codes, start, absmax.shape[0]), nested_absmax, offset

    # check_vma=False: all_gather's result counts as varying, though every device computes the same
    # nested statistics from it (the outputs declared replicated are so).
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=flat, out_specs=(flat, flat, P(), P()),
                                 check_vma=False))


def _nf4_from(abstract: nf4.NF4Tensor, mesh: Mesh, codes, absmax, nested_absmax, offset) -> nf4.NF4Tensor:
    nested_code = nf4.DYNAMIC_CODE if abstract.double_quant else np.zeros((0,), np.float32)
    return nf4.NF4Tensor(codes=codes, absmax=absmax, nested_absmax=nested_absmax, offset=offset,
                         nested_code=put(nested_code, NamedSharding(mesh, P())), shape=abstract.shape,
                         blocksize=abstract.blocksize, nested_blocksize=abstract.nested_blocksize,
                         double_quant=abstract.double_quant, dtype=abstract.dtype)


def _place_whole(q: nf4.NF4Tensor, mesh: Mesh) -> nf4.NF4Tensor:
    """A whole NF4Tensor (on any device) onto the mesh in nf4_specs' shardings, via the host."""
    specs = nf4_specs(q, mesh)
    return jax.tree.map(lambda a, s: put(np.asarray(a), NamedSharding(mesh, s)), q, specs)


def _quantized(reader: TensorReader, dtype, mesh: Mesh, config, warn) -> nf4.NF4Tensor:
    """The torch [out, in] weight of `reader`, cast to `dtype` and quantized to NF4 on `mesh`."""
    shape = reader.shape
    quantize = functools.partial(nf4.quantize, blocksize=config.blocksize, double_quant=config.double_quant)
    abstract = jax.eval_shape(quantize, jax.ShapeDtypeStruct(shape, dtype))
    if nf4_splits(abstract, mesh):
        n = math.prod(shape)
        dense = create((n,), NamedSharding(mesh, P(NF4_AXES)),
                       lambda index: np.ascontiguousarray(read_flat(reader, *flat_range(index, n)).astype(dtype, copy=False)))
        parts = _shard_quantizer(mesh, config.blocksize, config.double_quant)(dense)
        jax.block_until_ready(parts)  # one dense tensor in flight at a time
        dense.delete()
        return _nf4_from(abstract, mesh, *parts)
    if nf4_shards(mesh) > 1:
        warn(f"{reader.path}: {reader.name} {shape} in NF4 blocks of {config.blocksize} does not split into "
             f"whole blocks over fsdp x tensor = {nf4_shards(mesh)} devices: quantized whole on one device and "
             f"replicated", stacklevel=2)
    q = quantize(jnp.asarray(reader[:].astype(dtype)))
    return _place_whole(q, mesh)


def _bnb_nf4(weight: str, located: dict[str, Path], want: tuple, mesh: Mesh, warn) -> nf4.NF4Tensor:
    """One projection of a bitsandbytes 4-bit checkpoint onto `mesh` (see the module docstring)."""
    prefix = weight[:-len(WEIGHT)]
    suffix = {n[len(prefix):]: n for n in located}
    small = {}
    for s, n in suffix.items():
        if s not in (WEIGHT, ABSMAX):
            reader = TensorReader(located[n], n)
            small[s] = reader[:]
            reader.close()
    fast = _bnb_fast_layout(small, {s: TensorReader(located[n], n) for s, n in suffix.items() if s in (WEIGHT, ABSMAX)},
                            want, mesh)
    if fast is not None:
        return fast
    tensors = dict(small)
    for s in (WEIGHT, ABSMAX):
        if s in suffix:
            reader = TensorReader(located[suffix[s]], suffix[s])
            tensors[s] = reader[:]
            reader.close()
    where = located[weight] if weight in located else next(iter(located.values()))
    try:
        q = nf4.from_bnb_tensors(tensors)
    except ValueError as e:
        raise CheckpointError(f"{where}: {weight}: {e}") from None
    if q.shape != want:
        raise CheckpointError(f"{where}: {weight} holds a 4-bit weight of shape {q.shape}, config.json implies {want}")
    if nf4_shards(mesh) > 1 and not nf4_splits(q, mesh):
        warn(f"{where}: {weight} {q.shape} in NF4 blocks of {q.blocksize} does not split into whole blocks over "
             f"fsdp x tensor = {nf4_shards(mesh)} devices: replicated", stacklevel=2)
    return _place_whole(q, mesh)


def _bnb_fast_layout(small: dict, big: dict, want: tuple, mesh: Mesh) -> nf4.NF4Tensor | None:
    """The NF4Tensor with codes and absmax read per device, or None where the layout is not the common
    one (then the caller reads the weight whole and `nf4.from_bnb_tensors` checks it and names any fault)."""
    try:
        state_key = next(k for k in small if k.startswith("weight.quant_state"))
        state = json.loads(bytes(np.asarray(small[state_key], np.uint8)).decode("utf-8"))
        if (state_key != QUANT_STATE or state.get("quant_type") != "nf4" or tuple(state.get("shape") or ()) != want
                or state.get("blocksize") not in nf4.BLOCKSIZES or set(big) != {WEIGHT, ABSMAX}):
            return None
        double = NESTED_ABSMAX in small
        keys = {QUANT_MAP, state_key} | ({NESTED_ABSMAX, NESTED_QUANT_MAP} if double else set())
        n, blocksize = math.prod(want), state["blocksize"]
        blocks = -(-n // blocksize)
        codes, absmax = big[WEIGHT], big[ABSMAX]
        if (set(small) != keys or codes.dtype != "U8" or math.prod(codes.shape) != n // 2
                or absmax.dtype != ("U8" if double else "F32") or math.prod(absmax.shape) != blocks
                or not np.array_equal(np.asarray(small[QUANT_MAP], np.float32), nf4.NF4_CODE)):
            return None
        if double:
            nested_blocksize = state.get("nested_blocksize")
            nested, code = np.asarray(small[NESTED_ABSMAX]), np.asarray(small[NESTED_QUANT_MAP])
            if (state.get("nested_dtype") != "float32" or "nested_offset" not in state
                    or nested_blocksize != nf4.NESTED_BLOCKSIZE or nested.dtype != np.float32
                    or nested.size != -(-blocks // nested_blocksize) or code.dtype != np.float32 or code.size != 256
                    or state.get("dtype") not in ("float32", "bfloat16", "float16")):
                return None
        abstract = nf4.NF4Tensor(codes=None, absmax=None, nested_absmax=None, offset=None, nested_code=None,
                                 shape=want, blocksize=blocksize, double_quant=double, dtype=state.get("dtype"))
        if not nf4_splits(abstract, mesh):
            return None
        flat = NamedSharding(mesh, P(NF4_AXES))
        replicated = NamedSharding(mesh, P())
        codes_arr = create((n // 2,), flat, lambda index: np.ascontiguousarray(read_flat(codes, *flat_range(index, n // 2))))
        absmax_arr = create((blocks,), flat, lambda index: np.ascontiguousarray(read_flat(absmax, *flat_range(index, blocks))))
        if double:
            rest = (put(nested, replicated), put(np.float32(state["nested_offset"]), replicated),
                    put(code, replicated))
        else:
            rest = (put(np.zeros((0,), np.float32), replicated), put(np.float32(0), replicated),
                    put(np.zeros((0,), np.float32), replicated))
        return nf4.NF4Tensor(codes=codes_arr, absmax=absmax_arr, nested_absmax=rest[0], offset=rest[1],
                             nested_code=rest[2], shape=want, blocksize=blocksize,
                             nested_blocksize=nf4.NESTED_BLOCKSIZE, double_quant=double, dtype=state["dtype"])
    finally:
        for reader in big.values():
            reader.close()
