"""Rematerialization of one decoder layer: what its backward pass recomputes instead of storing.

    "none"     store every activation the backward needs (fastest, most memory)
    "dots"     store the outputs of the matrix products without batch dimensions (the q/k/v/o and MLP
               projections, LoRA's x A and (x A) B; jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
               and recompute the cheap elementwise work (norms, rotary, SiLU, attention) in the backward
    "full"     store only the layer's input; recompute the whole layer in its backward (jax.checkpoint)
    "offload"  as "full", but the layer's input lives in host memory between the forward and the backward
               (jax.checkpoint_policies.save_and_offload_only_these_names, device -> pinned_host): device
               memory then holds about one layer's activations, whatever the depth

Recompute: none < dots < full = offload (which also moves each layer input to the host and back); POLICIES
lists them lightest first. Device memory: none > full > offload, and "dots" is not reliably below "none":
jlora's projections accumulate in float32 (bf16 x bf16 -> f32, then cast) and LoRA runs in float32, so the
products "dots" saves are float32 where XLA, left alone, keeps the bf16 results. Compiled by libtpu for
v5e (a 4-layer, hidden-512 bf16 model, 4 x 2048 tokens over 4 chips; tests/long_context/test_remat_tpu.py)
the step held 585 MiB per chip with dots, 395 MiB with none, 263 MiB with full. So `--remat auto` tries
AUTO_ORDER (none, full, offload); "dots" is there to ask for by name.

Where offload runs: TPU and GPU move the named residuals to pinned host memory. The CPU backend accepts the
same program (its "pinned_host" memory is the same RAM, so nothing is saved there), so every policy runs
and is tested on CPU; `jlora plan` shows the host bytes a TPU compile reports.

`model.remat` holds the policy name (True/False are read as "full"/"none"). Policies are applied per
layer, so a scanned stack of layers applies the same policy inside the scan body.
"""
from __future__ import annotations

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

POLICIES = ("none", "dots", "full", "offload")  # lightest (least recompute) first
AUTO_ORDER = ("none", "full", "offload")  # what --remat auto tries, first that fits (see the module docstring)
LAYER_INPUT = "jlora_layer_input"  # checkpoint_name of each decoder layer's input (offloaded by "offload")


def policy_name(remat) -> str:
    """The policy a `model.remat` value names: True -> "full", False/None -> "none", a name -> itself."""
    if remat is True:
        return "full"
    if remat is False or remat is None:
        return "none"
    if remat not in POLICIES:
        raise ValueError(f"remat policy {remat!r} is not one of {', '.join(POLICIES)}")
    return remat


def checkpoint_policy(policy: str):
    """The jax.checkpoint `policy=` of a policy name (None: save nothing but the inputs); not for "none"."""
    policy = policy_name(policy)
    if policy == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if policy == "offload":
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=(), names_which_can_be_offloaded=(LAYER_INPUT,),
            offload_src="device", offload_dst="pinned_host")
    if policy == "full":
        return None
    raise ValueError(f"remat policy {policy!r} stores everything: no jax.checkpoint policy")


def call_layer(layer: nnx.Module, remat, *args):
    """layer(*args) under the remat policy `remat` (see module docstring); args[0] is the hidden state."""
    policy = policy_name(remat)
    if policy == "none":
        return layer(*args)
    graphdef, state = nnx.split(layer)

    def run(state, h, *rest):
        # Named so that "offload" can move it to the host: the recompute then starts from the host copy,
        # and the device keeps no copy of the layer input between the forward and the backward.
        return nnx.merge(graphdef, state)(checkpoint_name(h, LAYER_INPUT), *rest)

    return jax.checkpoint(run, policy=checkpoint_policy(policy))(state, *args)
