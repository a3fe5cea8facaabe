"""Run as a script with 8 virtual CPU devices: two optimizer steps on each mesh vs one device.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python sharded_step_check.py CHECKPOINT_DIR
prints {"errors": {case: max relative error of the adapter updates}, "nf4_split": NF4 codes arrays split
8 ways} as JSON.

Why updates under SGD with momentum, not AdamW: a sharded step sums the same float32 terms in another
order, so each gradient entry moves by at most about eps32 * sqrt(n) * sum|terms| (n tokens or features).
SGD (with clipping and momentum) is linear in the gradients, so the relative error of the update
(p2 - p0) stays at that level on every CPU; AdamW's first steps are lr * g / (|g| + eps), about
lr * sign(g), which amplifies the noise of any entry whose gradient sits near zero without limit, and
the AVX2 / AVX-512 summation orders then differ by more than any bound worth stating. The sharded
optimizer-state placement is still exercised (the momentum trace is sharded like the adapters).
lr = 1 keeps the updates (~1e-2) far above the float32 spacing of the adapters (~6e-8 at 0.5), which a
difference p2 - p0 cannot resolve below. Measured here (Xeon, AVX-512): largest error 1.1e-5.
"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jlora
from jlora.nf4 import NF4Tensor
from jlora.train.placement import opt_state_shardings, put_batch, shard_state
from jlora.train.sharding import flat_shardings, make_mesh, shard_flat
from jlora.train.state import SplitModel
from jlora.train.step import make_train_step

# name: (mesh, fused kernels, quantize). The kernels run impl="xla" under shard_map, as Pallas/Triton
# kernels do on a mesh; "nf4" is the default QLoRA step with the NF4 codes split over 8 devices.
CASES = {"data=8": ("data=8", None, None),
         "fsdp=4,tensor=2": ("fsdp=4,tensor=2", None, None),
         "data=2,fsdp=2,tensor=2": ("data=2,fsdp=2,tensor=2", None, None),
         "fsdp=4,tensor=2 nf4": ("fsdp=4,tensor=2", None, "nf4"),
         "fsdp=4,tensor=2 kernels": ("fsdp=4,tensor=2", "xla", None),
         "data=2,fsdp=2,tensor=2 kernels": ("data=2,fsdp=2,tensor=2", "xla", None),
         "data=2,fsdp=2,tensor=2 kernels nf4": ("data=2,fsdp=2,tensor=2", "xla", "nf4")}


def batch(rows=16, t=16, accum=2):
    rng = np.random.RandomState(0)
    b = {"inputs": rng.randint(0, 96, (rows, t)), "targets": rng.randint(0, 96, (rows, t)),
         "loss_mask": (rng.rand(rows, t) > 0.3), "positions": np.tile(np.arange(t), (rows, 1)),
         "segment_ids": np.ones((rows, t))}
    return {k: v.astype(np.int32).reshape(accum, rows // accum, t) for k, v in b.items()}


def run(path, mesh_spec, kernels=None, quantize=None):
    """Returns ({adapter name: p2 - p0}, number of NF4 codes arrays split 8 ways)."""
    model = jlora.get_peft_model(jlora.load_hf(path, quantize=quantize),
                                 jlora.LoraConfig(r=4, init_lora_weights=False), rngs=nnx.Rngs(0))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0, momentum=0.9))
    split = SplitModel.of(model)
    params, frozen = split.params(), split.frozen
    start = {k: np.asarray(v) for k, v in params.items()}
    split_codes = 0
    if mesh_spec is None:
        opt = tx.init(params)
        fn = jax.jit(make_train_step(split, tx))
        b = {k: jnp.asarray(v) for k, v in batch().items()}
    else:
        mesh = make_mesh(mesh_spec)
        if kernels:
            jlora.use_kernels(model, kernels, mesh=mesh)
            split = SplitModel.of(model)
        params, frozen = shard_flat(params, mesh), shard_state(frozen, mesh)
        codes = [v.get_value().codes for _, v in nnx.to_flat_state(frozen) if isinstance(v.get_value(), NF4Tensor)]
        split_codes = sum(c.addressable_shards[0].data.size * 8 == c.size for c in codes)
        opt = tx.init(params)
        opt_shard = opt_state_shardings(opt, mesh)
        opt = jax.device_put(opt, opt_shard)
        fn = jax.jit(make_train_step(split, tx), out_shardings=(flat_shardings(params, mesh), opt_shard, None))
        b = put_batch(batch(), mesh, 1)
        assert any(len(v.sharding.device_set) == 8 for v in params.values())
    for i in range(2):
        params, opt, _ = fn(params, opt, frozen, b, jax.random.key(0), jnp.asarray(i))
    return {k: np.asarray(v, np.float64) - start[k] for k, v in params.items()}, split_codes


def rel_error(got, want):
    return max(float(np.abs(got[k] - want[k]).max() / np.abs(want[k]).max()) for k in want)


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    refs = {q: run(sys.argv[1], None, quantize=q)[0] for q in (None, "nf4")}
    errors, nf4_split = {}, 0
    for name, (spec, kernels, quantize) in CASES.items():
        got, split_codes = run(sys.argv[1], spec, kernels=kernels, quantize=quantize)
        errors[name] = rel_error(got, refs[quantize])
        if name == "fsdp=4,tensor=2 nf4":
            nf4_split = split_codes
    print(json.dumps({"errors": errors, "nf4_split": nf4_split}))
