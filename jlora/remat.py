"""Rematerialization of one decoder layer: what its backward pass recomputes instead of storing.

    "none"     store every activation the backward needs (fastest, most memory)
    "dots"     store the projections' outputs (q/k/v/o and gate/up/down, fused qkv/gate_up: the values the
               model names PROJECTION through projection_output) in the compute dtype, and recompute the
               cheap elementwise work (norms, rotary, SiLU) and attention's forward in the backward
               (jax.checkpoint_policies.save_only_these_names)
    "full"     store only the layer's input; recompute the whole layer in its backward (jax.checkpoint)
    "offload"  as "full", but the layer's input lives in host memory between the forward and the backward
               (jax.checkpoint_policies.save_and_offload_only_these_names, device -> pinned_host): device
               memory then holds about one layer's activations, whatever the depth

Recompute: none < dots < full = offload (which also moves each layer input to the host and back); POLICIES
lists them lightest first. Device memory: none > dots > full > offload. "dots" once meant jax's
dots_with_no_batch_dims_saveable, which saved the float32 products (jlora's projections accumulate in float32,
then cast) and held more than "none" on a bf16 base (libtpu, v5e, a 4-layer hidden-512 bf16 model: 585 MiB
per chip against none's 395); the named outputs are bf16 there. XLA:CPU's compiled temporaries of a scanned
bf16 model (tests/long_context/test_remat_memory.py; hidden 64, 2 x 256 tokens, per layer): none 3.2 MiB,
dots 1.2, full 0.27; dots minus full is about 2x the named outputs' bytes (XLA holds the scan's stacked
residuals twice). libtpu agrees: the v5e and v5p steps (LoRA and QLoRA) hold none > dots > full in temporaries
(tests/long_context/test_remat_tpu.py), so `--remat auto` tries every policy in that order (AUTO_ORDER).

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
AUTO_ORDER = POLICIES  # what --remat auto tries, first that fits (see the module docstring)
LAYER_INPUT = "jlora_layer_input"  # checkpoint_name of each decoder layer's input (offloaded by "offload")
PROJECTION = "jlora_projection"  # checkpoint_name of each projection's output, in the compute dtype ("dots" saves it)


def projection_output(y):
    """`y` (a projection's output: q/k/v/o, gate/up/down, fused qkv/gate_up) named PROJECTION, which "dots"
    saves for the backward; outside jax.checkpoint the name does nothing."""
    return checkpoint_name(y, PROJECTION)


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
        return jax.checkpoint_policies.save_only_these_names(PROJECTION)
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
