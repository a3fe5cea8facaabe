"""Train-state names in the two layer layouts, and the exact map between them (resuming across --scan-layers).

    loop:     params["model.layers.{i}.R"]                 [...]            i = 0 .. N-1
    scanned:  params["model.layers.group.{j}.R"]           [G, ...]         layer i = g * p + j, g < G
              params["model.layers.tail.{t}.R"]            [...]            layer i = G * p + t

(jlora/models/stacked.py: p the period, G the groups.) The optimizer state holds the same names (optax
keeps a dict of params-shaped trees), so every dict keyed by such names, wherever it sits in the train
state, is mapped. Slicing and stacking only move numbers: a checkpoint resumed in the other layout
continues with exactly the saved adapters and moments.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp

GROUP = re.compile(r"^(?P<pre>(?:.*\.)?layers\.)group\.(?P<j>\d+)\.(?P<rest>.+)$")
TAIL = re.compile(r"^(?P<pre>(?:.*\.)?layers\.)tail\.(?P<t>\d+)\.(?P<rest>.+)$")
LOOP = re.compile(r"^(?P<pre>(?:.*\.)?layers\.)(?P<i>\d+)\.(?P<rest>.+)$")


def is_scanned(names) -> bool:
    return any(GROUP.match(n) for n in names)


def period_and_groups(shapes: dict[str, tuple]) -> tuple[int, int]:
    """(p, G) of a scanned layout from {name: shape} (names may carry a prefix such as `params.`)."""
    found = [(int(m["j"]), shape) for n, shape in shapes.items() if (m := GROUP.match(n))]
    return 1 + max(j for j, _ in found), found[0][1][0]


def to_loop(flat: dict, p: int, groups: int, row) -> dict:
    """Scanned names -> loop names; `row(value, g)` cuts row g of a stack."""
    out = {}
    for name, value in flat.items():
        if m := GROUP.match(name):
            for g in range(groups):
                out[f"{m['pre']}{g * p + int(m['j'])}.{m['rest']}"] = row(value, g)
        elif m := TAIL.match(name):
            out[f"{m['pre']}{groups * p + int(m['t'])}.{m['rest']}"] = value
        else:
            out[name] = value
    return out


def to_scanned(flat: dict, p: int, groups: int, stack) -> dict:
    """Loop names -> scanned names; `stack(values)` stacks the rows g = 0 .. G-1 of one variable."""
    out, rows = {}, {}
    for name, value in flat.items():
        m = LOOP.match(name)
        if m is None:
            out[name] = value
            continue
        i = int(m["i"])
        if i >= groups * p:
            out[f"{m['pre']}tail.{i - groups * p}.{m['rest']}"] = value
        else:
            rows.setdefault(f"{m['pre']}group.{i % p}.{m['rest']}", {})[i // p] = value
    for name, by_row in rows.items():
        out[name] = stack([by_row[g] for g in range(groups)])
    return out


def map_name_dicts(tree, fn):
    """`tree` with every dict keyed by layer names replaced by fn(dict) (tuples, namedtuples, lists and
    other dicts walked into; anything else kept)."""
    if isinstance(tree, dict):
        if any(isinstance(k, str) and (LOOP.match(k) or GROUP.match(k) or TAIL.match(k)) for k in tree):
            return fn(tree)
        return {k: map_name_dicts(v, fn) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(map_name_dicts(v, fn) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(map_name_dicts(v, fn) for v in tree)
    return tree


def _replicated(like_leaf):
    sharding = getattr(like_leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return sharding


def abstract_row(x, g):
    if not hasattr(x, "shape"):  # optax.MaskedNode and other empty nodes
        return x
    return jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype, sharding=_replicated(x))


def abstract_stack(xs):
    if not hasattr(xs[0], "shape"):
        return xs[0]
    return jax.ShapeDtypeStruct((len(xs),) + tuple(xs[0].shape), xs[0].dtype, sharding=_replicated(xs[0]))


def value_row(x, g):
    return x[g] if hasattr(x, "shape") else x


def value_stack(xs):
    return jnp.stack(xs) if hasattr(xs[0], "shape") else xs[0]
