"""Scanned decoder layers: parameters stacked on a leading layer axis, one period of layers scanned.

    loop model:     model.layers = [L_0, L_1, ..., L_{N-1}]                  (nnx.List, one module per layer)
    scanned model:  model.layers = ScannedLayers(group=[S_0, ..., S_{p-1}], tail=[L_{G p}, ..., L_{N-1}])
                    S_j's every array is stack(L_j, L_{j+p}, ..., L_{j+(G-1)p}) on a new axis 0, G = N // p

    h = scan(body, h, (S_0, ..., S_{p-1}))   body(h, (s_0, ..., s_{p-1})): for j < p: h = layer_j[s_j](h)
    then the tail layers (N mod p of them) run as a Python loop.

p is the shortest period of the layers' *structure*: layer i and layer i + p must have the same nnx graph
(the same modules and static attributes, so the same LayerSpec: window, rope table; the same LoRA rank and
scaling) and the same array shapes and dtypes. Llama/Qwen: p = 1; Gemma2 (sliding, global, ...): p = 2;
Gemma3 (five local + one global): p = 6, and a depth that is not a multiple of 6 (gemma-3-1b: 26 layers)
scans 4 periods and loops the 2 layers left. Where no period repeats (per-layer LoRA ranks from
rank_pattern that differ layer by layer, e.g. `{"layers.3.": 64}`), p = N and G = 1: the model is then
scanned over one step, i.e. compiled as the loop model is; ranks that repeat with the pattern still scan.

XLA compiles the body once, so the compiled program no longer grows with depth. The per-layer remat
policy (jlora.remat.call_layer, `model.remat`) is applied to each layer inside the body, as in the loop.

`jlora train` scans by default where nothing needs the loop (TrainConfig.scan_layers, jlora/train/layers.py);
in Python it is `stack_layers(model)` or `load_hf(..., scan_layers=True)`: HF names stay the public
contract, and the code that walks `model.model.layers` by index (get_peft_model, the converters and
exporters) sees a loop model (KV-cache generation runs through the scan: `ScannedLayers.__call__`):
`unstack_layers(model)` restores it (exact: stacking and unstacking only move arrays), and `as_loop(model)`
is what exporters call. Anything held in a layer's state stacks: dense kernels, NF4Weight (its NF4Tensor
arrays stack; shape/blocksize are static),
LoRA A/B. Mutable per-layer state (LoRA dropout's RNG counters) would not be carried out of the scan:
layers with RNG state (lora_dropout > 0) are refused (ValueError); train those with the loop model.

Memory: stacking, unstacking and the loaders' direct build (`LayerStackBuilder`: load_hf(scan_layers=True)
fills an abstract loop model tensor by tensor and stacks each variable as soon as its last layer's row is
read) work one variable at a time and drop the rows of a variable once it is stacked (the old layers'
Variables become abstract), so the peak is about one copy of the layers plus one variable's stack, never
the loop model and the scanned model side by side. On a mesh a stack is created in its row's sharding with
the layer axis whole (jlora.convert.mesh_rules), so stacking moves nothing between devices.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jlora.remat import call_layer


class ScannedLayers(nnx.Module):
    """A stack of N decoder layers as `period` stacked modules (leading axis `groups`) plus a looped tail."""

    def __init__(self, group: list[nnx.Module], tail: list[nnx.Module], *, groups: int):
        self.group = nnx.List(group)
        self.tail = nnx.List(tail)
        self.groups = groups
        self.period = len(group)

    def __len__(self) -> int:
        return self.groups * self.period + len(self.tail)

    def __getitem__(self, i: int) -> nnx.Module:
        """Layer i as a module of its own: a READ-ONLY copy (its arrays sliced out of the stack; assigning
        to it does not reach the stack). Readers that address layers by index (the PEFT, merged and 4-bit
        exporters, adapted_modules) work on a scanned model through it; writers unstack first."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"layer {i} of a scanned stack of {n} layers")
        i %= n
        if i >= self.groups * self.period:
            return self.tail[i - self.groups * self.period]
        graphdef, state = nnx.split(self.group[i % self.period])
        return nnx.merge(graphdef, jax.tree.map(lambda x: _slice(x, i // self.period), state))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __call__(self, h, tables, mask, remat, cache=None):
        """h -> h through every layer in order; `tables` maps a LayerSpec.rope name to its (cos, sin).

        With `cache` (generation: a jlora.generate.cache.KVCache, k/v stacked [layers, ...]) this returns
        (h, cache): the whole cache rides in the scan's carry and layer g * period + j writes its own slice
        in place (no per-layer copy, and one compiled body for any depth); no remat, as in the loop."""
        graphdefs, states = zip(*(nnx.split(layer) for layer in self.group))

        def run(layer, h, cache, i):
            cos, sin = tables.get(layer.rope, tables["global"])
            if cache is None:
                return call_layer(layer, remat, h, cos, sin, mask), None
            return layer(h, cos, sin, mask, cache.at_layer(i))

        def body(carry, xs):
            (h, cache), (g, states) = carry, xs
            for j, (graphdef, state) in enumerate(zip(graphdefs, states)):
                h, cache = run(nnx.merge(graphdef, state), h, cache, g * self.period + j)
            return (h, cache), None

        (h, cache), _ = jax.lax.scan(body, (h, cache), (jnp.arange(self.groups, dtype=jnp.int32), states))
        for t, layer in enumerate(self.tail):
            h, cache = run(layer, h, cache, self.groups * self.period + t)
        return h if cache is None else (h, cache)


def _signature(layer: nnx.Module):
    """What must agree for two layers to share a scanned body: the graph and every array's shape/dtype."""
    graphdef, state = nnx.split(layer)
    leaves, treedef = jax.tree.flatten(state)  # flat: NF4Tensor compares by identity (eq=False)
    return graphdef, treedef, [(tuple(x.shape), str(x.dtype)) for x in leaves]


def structural_period(layers) -> int:
    """The shortest p with layer i and layer i + p alike (same graph, shapes, dtypes) for all i + p < N."""
    sigs = [_signature(layer) for layer in layers]
    n = len(sigs)
    for p in range(1, n + 1):
        if all(sigs[i] == sigs[i + p] for i in range(n - p)):
            return p
    return n


def _get(module, path: tuple):
    for p in path:
        module = module[p] if isinstance(p, int) else getattr(module, p)
    return module


def _abstract(value):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype), value)


def _release(var: nnx.Variable) -> None:
    """Drops a Variable's arrays (its value becomes ShapeDtypeStructs): the module that held it is spent."""
    var.set_value(_abstract(var.get_value()))


def _templates(module: nnx.Module) -> tuple:
    """(graphdef, [(path, abstract Variable)]) of a module: its structure without holding its arrays."""
    graphdef, state = nnx.split(module)
    return graphdef, [(path, var.replace(_abstract(var.get_value()))) for path, var in nnx.to_flat_state(state)]


def _stack(modules: list[nnx.Module]) -> nnx.Module:
    """One module whose arrays are the modules' arrays stacked on axis 0 (the modules must be alike).
    Variable by variable: once a variable is stacked its rows are released (`_release`)."""
    graphdef, templates = _templates(modules[0])
    items = []
    for path, template in templates:
        items.append((path, template.replace(_stack_rows([_get(m, path) for m in modules]))))
    return nnx.merge(graphdef, nnx.from_flat_state(items))


def _stack_rows(rows: list) -> object:
    """The variables' values stacked on a new axis 0; each row is released once the stack exists."""
    stacked = jax.tree.map(_stack_leaves, *[v.get_value() for v in rows])
    for v in rows:
        _release(v)
    return stacked


def _stack_leaves(*xs):
    if isinstance(xs[0], jax.ShapeDtypeStruct):  # an abstract model (abstract_model, load_hf's target)
        return jax.ShapeDtypeStruct((len(xs),) + tuple(xs[0].shape), xs[0].dtype)
    sharding = getattr(xs[0], "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:  # the row's sharding, layer axis whole
        spec = NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
        return _jit_stack(spec)(*xs)
    return jnp.stack(xs)


@functools.cache
def _jit_stack(sharding):
    return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)


@functools.cache
def _jit_row(sharding, g: int):
    return jax.jit(lambda x: x[g], out_shardings=sharding)


def _slice(x, g: int):
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype)
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
        return _jit_row(NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:])), g)(x)
    return x[g]


def _unstack(module: nnx.Module, groups: int) -> list[nnx.Module]:
    """The `groups` modules sliced out of a stacked one, variable by variable (each stack released once
    its rows are cut)."""
    graphdef, templates = _templates(module)
    items: list[list] = [[] for _ in range(groups)]
    for path, template in templates:
        var = _get(module, path)
        value = var.get_value()
        for g in range(groups):
            items[g].append((path, template.replace(jax.tree.map(lambda x: _slice(x, g), value))))
        del value
        _release(var)
    return [nnx.merge(graphdef, nnx.from_flat_state(rows)) for rows in items]


def is_stacked(model) -> bool:
    """Whether `model` (a CausalLM) holds its decoder layers as a ScannedLayers."""
    return isinstance(getattr(getattr(model, "model", None), "layers", None), ScannedLayers)


def stack_layers(model):
    """Turns a loop model into a scanned one, in place, and returns it (a scanned model is returned as is).

    The arrays are copied into stacked ones one variable at a time, each variable's rows released once it
    is stacked (peak: the layers once plus one variable's stack); logits and gradients are the loop
    model's (same operations, in the same order, per layer).
    """
    if is_stacked(model):
        return model
    layers = list(model.model.layers)
    if any(jax.tree.leaves(nnx.state(layer, nnx.RngState)) for layer in layers):
        raise ValueError("scan_layers: the decoder layers hold RNG state (LoRA dropout > 0), whose per-step "
                         "updates a scan would not carry; train with lora_dropout=0 or with the loop model")
    p = structural_period(layers)
    groups = len(layers) // p
    group = [_stack(layers[j:groups * p:p]) for j in range(p)]
    model.model.layers = ScannedLayers(group, layers[groups * p:], groups=groups)
    return model


def unstack_layers(model):
    """Turns a scanned model back into the loop model (nnx.List of layers), in place, and returns it."""
    if not is_stacked(model):
        return model
    stack = model.model.layers
    per_position = [_unstack(m, stack.groups) for m in stack.group]
    layers = [per_position[i % stack.period][i // stack.period] for i in range(stack.groups * stack.period)]
    model.model.layers = nnx.List(layers + list(stack.tail))
    return model


def as_loop(model):
    """`model` with its layers as a loop (unstacked in place when scanned): what exporters and the
    converters, which address layers by index under their HF names, call first."""
    return unstack_layers(model)


def on_loop_model(fn):
    """Decorates `fn(model, ...)` that writes into layers by index (get_peft_model, quantize_model,
    load_adapter): a scanned model is unstacked for the call and stacked again after (with whatever the
    call attached: LoRA adapters stack as the layers do, per pattern position; ranks that differ within
    a position make the period longer, see the module docstring)."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        if not is_stacked(model):
            return fn(model, *args, **kwargs)
        return stack_layers(fn(unstack_layers(model), *args, **kwargs))

    return wrapper


def scan_option(fn):
    """Adds `scan_layers=False` to a model constructor or loader (`load_hf`, `abstract_model`): True
    returns the model with its layers stacked and scanned (`stack_layers`)."""
    @functools.wraps(fn)
    def wrapper(*args, scan_layers: bool = False, **kwargs):
        model = fn(*args, **kwargs)
        return stack_layers(model) if scan_layers else model

    return wrapper


class LayerStackBuilder:
    """Builds a scanned model's stacked arrays straight from a loader's per-layer reads.

        builder = LayerStackBuilder(abstract_loop_model)   # the period from the abstract layers
        ... the loader places tensor `path` (("model", "layers", i, *rest)), then calls builder.placed(path)
        builder.finish()                                   # model.model.layers becomes a ScannedLayers

    On one device a dense tensor goes straight into its row of a host buffer (`take`), which becomes the
    stacked array once its last row is written: no per-layer array is ever made, so the peak is about one
    copy of the layers plus one variable. Otherwise (NF4 quantized or read as loaded, the sharded load) each
    variable (pattern position j, path inside the layer) is stacked as soon as its last row is `placed`,
    and its rows are released: live arrays stay about one copy plus one variable's rows (XLA's allocator
    may keep the freed rows' pages, so the process's RSS can sit above that). A value the loader replaces
    (a dense kernel quantized to an NF4Weight) stacks as what it became.
    """

    def __init__(self, model):
        self.model = model
        self.layers = list(model.model.layers)
        self.period = structural_period(self.layers)
        self.groups = len(self.layers) // self.period
        self._rows: dict[tuple, set[int]] = {}
        self._stacked: dict[tuple, object] = {}
        self._buffers: dict[tuple, np.ndarray] = {}

    def _key(self, path: tuple):
        """(pattern position, path inside the layer, row) of a stacked layer's variable, else None."""
        if tuple(path[:2]) != ("model", "layers") or path[2] >= self.groups * self.period:
            return None  # embed, norm, head and the looped tail stay as they are
        return (path[2] % self.period, tuple(path[3:])), path[2] // self.period

    def take(self, path: tuple, row: np.ndarray, dtype) -> bool:
        """Writes a host array into its row of the stack being built (a host buffer [groups, ...] in `dtype`,
        put on the device once its last row is written): True when `path` is a stacked variable, which
        then never holds a per-layer array at all (on one device; the sharded load stacks via `placed`)."""
        key = self._key(path)
        if key is None:
            return False
        key, g = key
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = np.empty((self.groups,) + tuple(row.shape), np.dtype(jnp.dtype(dtype)))
        buffer[g] = row
        rows = self._rows.setdefault(key, set())
        rows.add(g)
        if len(rows) == self.groups:
            self._stacked[key] = jax.block_until_ready(jnp.asarray(self._buffers.pop(key)))
        return True

    def placed(self, path: tuple) -> None:
        """`path` (an attribute path from the model, as hf_names.Entry.path) now holds its loaded value."""
        found = self._key(path)
        if found is None:
            return  # not stacked
        key, g = found
        if key in self._buffers or key in self._stacked:
            return  # written by `take`
        j, rest = key
        rows = self._rows.setdefault(key, set())
        rows.add(g)
        if len(rows) == self.groups:
            self._stacked[key] = _stack_rows([_get(self.layers[j + r * self.period], rest) for r in range(self.groups)])

    def finish(self):
        """Installs the ScannedLayers (every stacked variable must have been placed) and returns the model."""
        group = []
        for j in range(self.period):
            graphdef, templates = _templates(self.layers[j])
            items = []
            for path, template in templates:
                if (j, path) not in self._stacked:
                    raise ValueError(f"scan_layers: model.layers.{j}.{'.'.join(map(str, path))} was never loaded "
                                     f"into the stack ({sorted(self._rows.get((j, path), ()))} of "
                                     f"{self.groups} rows placed)")
                items.append((path, template.replace(self._stacked.pop((j, path)))))
            group.append(nnx.merge(graphdef, nnx.from_flat_state(items)))
        self.model.model.layers = ScannedLayers(group, self.layers[self.groups * self.period:], groups=self.groups)
        self.layers = []
        return self.model
