"""Rematerialization of one decoder layer: what its backward pass recomputes instead of storing.

    "none"   store every activation the backward needs (fastest, most memory)
    "full"   store only the layer's input; recompute the whole layer in its backward (jax.checkpoint)

`model.remat` holds the policy name (True/False are read as "full"/"none"). Policies are applied per
layer, so a scanned stack of layers applies the same policy inside the scan body.
"""
from __future__ import annotations

import jax
from flax import nnx

POLICIES = ("none", "full")


def policy_name(remat) -> str:
    """The policy a `model.remat` value names: True -> "full", False/None -> "none", a name -> itself."""
    if remat is True:
        return "full"
    if remat is False or remat is None:
        return "none"
    if remat not in POLICIES:
        raise ValueError(f"remat policy {remat!r} is not one of {', '.join(POLICIES)}")
    return remat


def call_layer(layer: nnx.Module, remat, *args):
    """layer(*args) under the remat policy `remat` (see module docstring)."""
    policy = policy_name(remat)
    if policy == "none":
        return layer(*args)
    graphdef, state = nnx.split(layer)

    def run(state, *args):
        return nnx.merge(graphdef, state)(*args)

    return jax.checkpoint(run)(state, *args)
