"""Run as a script with 8 virtual CPU devices: two AdamW steps on an NF4 base, sharded vs one device.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python sharded_nf4_check.py CHECKPOINT_DIR
prints {"error": max relative error of the updated adapters, "split": NF4 codes arrays split 8 ways}.
"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jlora
from jlora.nf4 import NF4Tensor
from jlora.train.optimizer import make_optimizer
from jlora.train.placement import opt_state_shardings, shard_state
from jlora.train.sharding import flat_shardings, make_mesh, shard_flat
from jlora.train.state import SplitModel
from jlora.train.step import make_train_step


def batch(rows=8, t=8):
    rng = np.random.RandomState(0)
    b = {"inputs": rng.randint(0, 96, (rows, t)), "targets": rng.randint(0, 96, (rows, t)),
         "loss_mask": rng.rand(rows, t) > 0.3, "positions": np.tile(np.arange(t), (rows, 1)),
         "segment_ids": np.ones((rows, t))}
    return {k: jnp.asarray(v.astype(np.int32)[None]) for k, v in b.items()}


def run(path, mesh_spec):
    model = jlora.get_peft_model(jlora.load_hf(path, quantize="nf4"), jlora.LoraConfig(r=4, init_lora_weights=False),
                                 rngs=nnx.Rngs(0))
    split = SplitModel.of(model)
    tx = make_optimizer(lambda s: 1e-2)
    params, frozen = split.params(), split.frozen
    split_codes = 0
    kw = {}
    if mesh_spec:
        mesh = make_mesh(mesh_spec)
        params, frozen = shard_flat(params, mesh), shard_state(frozen, mesh)
        codes = [v.get_value().codes for _, v in nnx.to_flat_state(frozen) if isinstance(v.get_value(), NF4Tensor)]
        split_codes = sum(c.addressable_shards[0].data.size * 8 == c.size for c in codes)
        kw = dict(out_shardings=(flat_shardings(params, mesh), opt_state_shardings(tx.init(params), mesh), None))
    opt = tx.init(params)
    step = jax.jit(make_train_step(split, tx), **kw)
    for i in range(2):
        params, opt, _ = step(params, opt, frozen, batch(), jax.random.key(0), jnp.asarray(i))
    return {k: np.asarray(v) for k, v in params.items()}, split_codes


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    ref, _ = run(sys.argv[1], None)
    got, split_codes = run(sys.argv[1], "fsdp=4,tensor=2")
    err = max(float(np.abs(got[k] - ref[k]).max() / np.abs(ref[k]).max()) for k in ref)
    print(json.dumps({"error": err, "split": split_codes}))
