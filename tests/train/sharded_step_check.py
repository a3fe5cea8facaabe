"""Run as a script with 8 virtual CPU devices: one AdamW step on each mesh vs one device.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python sharded_step_check.py CHECKPOINT_DIR
prints {mesh: max relative error of the updated adapters} as JSON.
"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jlora
from jlora.train.optimizer import make_optimizer
from jlora.train.placement import opt_state_shardings, put_batch, shard_state
from jlora.train.sharding import flat_shardings, make_mesh, shard_flat
from jlora.train.state import SplitModel
from jlora.train.step import make_train_step

MESHES = ["data=8", "fsdp=4,tensor=2", "data=2,fsdp=2,tensor=2"]
# The fused-kernel path (impl="xla" under shard_map, as Pallas/Triton kernels run on a mesh), dense and NF4.
KERNEL_CASES = {"fsdp=4,tensor=2 kernels": ("fsdp=4,tensor=2", None),
                "data=2,fsdp=2,tensor=2 kernels": ("data=2,fsdp=2,tensor=2", None),
                "data=2,fsdp=2,tensor=2 kernels nf4": ("data=2,fsdp=2,tensor=2", "nf4")}


def batch(rows=16, t=16, accum=2):
    rng = np.random.RandomState(0)
    b = {"inputs": rng.randint(0, 96, (rows, t)), "targets": rng.randint(0, 96, (rows, t)),
         "loss_mask": (rng.rand(rows, t) > 0.3), "positions": np.tile(np.arange(t), (rows, 1)),
         "segment_ids": np.ones((rows, t))}
    return {k: v.astype(np.int32).reshape(accum, rows // accum, t) for k, v in b.items()}


def run(path, mesh_spec, kernels=None, quantize=None):
    model = jlora.get_peft_model(jlora.load_hf(path, quantize=quantize),
                                 jlora.LoraConfig(r=4, init_lora_weights=False), rngs=nnx.Rngs(0))
    split = SplitModel.of(model)
    tx = make_optimizer(lambda s: 1e-2, weight_decay=0.01, max_grad_norm=1.0)
    params, frozen = split.params(), split.frozen
    step = make_train_step(split, tx)
    if mesh_spec is None:
        opt = tx.init(params)
        fn = jax.jit(step)
        b = {k: jnp.asarray(v) for k, v in batch().items()}
    else:
        mesh = make_mesh(mesh_spec)
        if kernels:
            jlora.use_kernels(model, kernels, mesh=mesh)
            split = SplitModel.of(model)
            step = make_train_step(split, tx)
        params, frozen = shard_flat(params, mesh), shard_state(frozen, mesh)
        opt = tx.init(params)
        opt_shard = opt_state_shardings(opt, mesh)
        opt = jax.device_put(opt, opt_shard)
        fn = jax.jit(step, out_shardings=(flat_shardings(params, mesh), opt_shard, None))
        b = put_batch(batch(), mesh, 1)
        assert any(len(v.sharding.device_set) == 8 for v in params.values())
    for i in range(2):
        params, opt, _ = fn(params, opt, frozen, b, jax.random.key(0), jnp.asarray(i))
    return {k: np.asarray(v) for k, v in params.items()}


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    ref = run(sys.argv[1], None)
    out = {}
    for spec in MESHES:
        got = run(sys.argv[1], spec)
        out[spec] = max(float(np.abs(got[k] - ref[k]).max() / np.abs(ref[k]).max()) for k in ref)
    refs = {None: ref, "nf4": run(sys.argv[1], None, quantize="nf4")}
    for name, (spec, quantize) in KERNEL_CASES.items():
        got, want = run(sys.argv[1], spec, kernels="xla", quantize=quantize), refs[quantize]
        out[name] = max(float(np.abs(got[k] - want[k]).max() / np.abs(want[k]).max()) for k in want)
    print(json.dumps(out))
