"""`load_hf(dir, mesh=...)` creates every array per shard on 8 virtual CPU devices (fsdp=8).

The checks run in one subprocess (this file as a script), since the 8 devices must be requested before
JAX starts; it writes a JSON report and the logits, and the tests here compare them with transformers
(float32 against its float64 truth, conftest.float32_close) and with the unsharded load.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python test_sharded_load.py OUT FAMILY=CKPT...
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

FAMILIES = ("llama", "qwen2")  # qwen2: q/k/v biases (replicated)
IDS = np.random.RandomState(3).randint(0, 96, (2, 16))


@pytest.fixture(scope="module")
def report(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded-load")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, __file__, str(out), *(f"{f}={checkpoint(f)}" for f in FAMILIES)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "report.json").read_text())


def test_every_array_holds_an_eighth_per_device(report):
    _, r = report
    for family in FAMILIES:
        for case in (family, f"{family} nf4")[:2 if family == "llama" else 1]:
            got = r[case]
            assert got["unsplit"] == [], (case, got["unsplit"])  # every kernel/embedding/NF4 run split 8 ways
            assert got["whole_reads"] == [], (case, got["whole_reads"])  # each read only a device's slice
            # Each device holds exactly 1/8 of the split arrays plus the small replicated ones (norms,
            # biases, NF4 statistics), and nothing else is alive on device 0 after the load. The live-buffer
            # count is a bound, not an equality: XLA:CPU may hand a new array a buffer it already held (a
            # cached constant), which the "before" set then excludes (seen once: 6,036 of 19,348 bytes).
            want = got["split_bytes"] // 8 + got["replicated_bytes"]
            assert got["device_bytes"] == [want] * 8, (case, got["device_bytes"], want)
            assert got["device0_live_bytes"] <= want, (case, got)
            assert got["trainer_moves"] == 0, case  # the trainer's placement keeps the loaded shardings
    assert r["llama nf4"]["split_arrays"] == 2 * 7 * 2 + 2  # NF4 codes and absmax of 14 projections; embed, head


def test_logits_equal_transformers_and_the_unsharded_load(report, checkpoint, hf_model, close32, logits32_and_64,
                                                          rel):
    out, _ = report
    for family in FAMILIES:
        want, want64 = logits32_and_64(hf_model(checkpoint(family)), IDS)
        sharded, single = np.load(out / f"{family}.npy"), np.load(out / f"{family}-single.npy")
        close32(sharded, want, want64, what=f"{family} fsdp=8")
        assert rel(sharded, single) <= 1e-5, family
    # NF4: the same weights, bit for bit; the forward equals the unsharded one's up to summation order
    assert rel(np.load(out / "llama-nf4.npy"), np.load(out / "llama-nf4-single.npy")) <= 1e-5


def test_weights_are_bit_identical_to_the_unsharded_load(report):
    _, r = report
    for case in ("llama", "qwen2", "llama nf4", "llama nf4 blocksize 256", "llama bnb checkpoint",
                 "llama bnb checkpoint no double quant"):
        assert r[case]["nf4_bit_equal"], case
    for case in ("llama bnb checkpoint", "llama bnb checkpoint no double quant"):
        assert r[case]["unsplit"] == [] and r[case]["whole_reads"] == [], r[case]
    # blocksize 256: q/o_proj (32 x 32 = 4 blocks), k/v_proj (16 x 32 = 2) cannot give 8 devices whole
    # blocks: replicated with a warning naming each; the MLP projections (8 blocks) still split
    fallback = r["llama nf4 blocksize 256"]
    assert sorted(fallback["warned"]) == sorted(f"model.layers.{i}.self_attn.{p}_proj.weight"
                                                for i in range(2) for p in "qkvo")
    assert len(fallback["unsplit"]) == 2 * 4 * 2  # codes and absmax of those 8 weights
    assert fallback["whole_reads"] == sorted(fallback["warned"])


def test_a_mesh_with_replicas_reads_each_shard_once(report):
    _, r = report
    for case in ("llama data=2,fsdp=2,tensor=2", "llama nf4 data=2,fsdp=2,tensor=2"):
        assert r[case]["nf4_bit_equal"], case
    # 4 distinct shards per split tensor (fsdp x tensor), not 8 reads: the data replicas share one
    dense = r["llama data=2,fsdp=2,tensor=2"]
    assert dense["reads"] == 16 * 4 + 5, dense  # 14 projections, embedding, head; 5 norms read whole


def test_an_axis_that_does_not_divide_a_dimension_is_an_error_naming_it(report):
    _, r = report
    assert r["mesh error"] == ("model.embed_tokens.weight: shape (96, 32) cannot be split over mesh axis 'fsdp' "
                               "of size 3 (dimension 32 is not a multiple of it) on mesh {'data': 1, 'fsdp': 3, "
                               "'tensor': 1}; pick a mesh whose fsdp size divides 32")


@pytest.mark.slow  # two processes joined by jax.distributed (~1 min)
def test_two_hosts_each_read_only_their_own_slices(checkpoint, tmp_path):
    import socket
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        address = f"localhost:{sock.getsockname()[1]}"
    procs = [subprocess.Popen([sys.executable, __file__, "--host", str(tmp_path / f"host{i}.json"),
                               str(checkpoint("llama"))], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "JAX_PLATFORMS": "cpu",
                                   "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                                   "JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2",
                                   "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    try:
        results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    hosts = [json.loads((tmp_path / f"host{i}.json").read_text()) for i in range(2)]
    for case in ("dense", "nf4"):
        first, second = (h[case] for h in hosts)
        assert first["bit_equal"] and second["bit_equal"], case  # the gathered arrays equal a one-device load
        assert set(first["reads"]) == set(second["reads"]), case  # the same tensors
        for name, mine in first["reads"].items():
            theirs = second["reads"][name]
            if mine["whole_bytes"] <= 1024:
                continue  # norms: replicated, read whole by both
            # each host read its 4 devices' eighths and nothing of the other host's
            assert len(mine["slices"]) == len(theirs["slices"]) == 4, (case, name, mine, theirs)
            assert not set(map(str, mine["slices"])) & set(map(str, theirs["slices"])), (case, name)
            assert mine["bytes"] * 2 == theirs["bytes"] * 2 == mine["whole_bytes"], (case, name)


# -- the subprocess ----------------------------------------------------------------------------------------------

def _held(model, mesh):
    """Bytes per device, split / replicated totals, the arrays not split 8 ways, for every array of `model`."""
    import jax
    from flax import nnx
    per_device = {d: 0 for d in mesh.devices.flat}
    split = replicated = 0
    unsplit, split_arrays = [], 0
    for path, v in nnx.to_flat_state(nnx.state(model)):
        name = ".".join(map(str, path))
        for i, a in enumerate(jax.tree.leaves(v.get_value())):  # an NF4Tensor: codes, absmax, statistics
            for s in a.addressable_shards:
                per_device[s.device] += s.data.nbytes
            if a.sharding.is_fully_replicated:
                replicated += a.nbytes
                if (name.endswith("kernel") or name.endswith("embed_tokens.weight")) and i < 2:
                    unsplit.append(f"{name}[{i}]")
            else:
                split += a.nbytes
                split_arrays += 1
                assert all(s.data.size * 8 == a.size for s in a.addressable_shards), name
    return dict(device_bytes=[per_device[d] for d in mesh.devices.flat], split_bytes=split,
                replicated_bytes=replicated, unsplit=unsplit, split_arrays=split_arrays)


def _device0_live_bytes(excluding=frozenset()):
    import jax
    device = jax.devices()[0]
    buffers = {}  # a global array and its per-device pieces are both live arrays: count each buffer once
    for a in jax.live_arrays():
        for s in a.addressable_shards:
            if s.device == device:
                buffers[s.data.unsafe_buffer_pointer()] = s.data.nbytes
    return sum(n for p, n in buffers.items() if p not in excluding)


def _trainer_moves(model, mesh):
    """How many frozen arrays the trainer's placement (shard_state) would move after this load."""
    import jax
    from flax import nnx

    import jlora
    from jlora.train.placement import shard_state
    from jlora.train.state import SplitModel
    peft = jlora.get_peft_model(model, jlora.LoraConfig(r=4), rngs=nnx.Rngs(0))
    frozen = SplitModel.of(peft).frozen
    placed = shard_state(frozen, mesh)
    return sum(a is not b for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(placed)))


def _bit_equal(a, b) -> bool:
    import jax
    from flax import nnx
    sa, sb = nnx.to_flat_state(nnx.state(a)), dict(nnx.to_flat_state(nnx.state(b)))
    for path, v in sa:
        for x, y in zip(jax.tree.leaves(v.get_value()), jax.tree.leaves(sb[path].get_value()), strict=True):
            x, y = np.asarray(x), np.asarray(y)
            if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
                return False
    return True


def _main(out: Path, checkpoints: list[str]):
    import time
    import warnings

    import jax

    import jlora
    from jlora.convert.quantized import save_quantized
    from jlora.train.sharding import make_mesh
    assert jax.device_count() == 8
    from jlora.convert import sharded_load
    mesh = make_mesh("fsdp=8")
    report = {}
    reads = []  # (tensor, bytes of one read, bytes of the tensor): what the loader read from the files
    read = sharded_load.TensorReader.__getitem__

    def spy(self, index):
        part = read(self, index)
        reads.append((self.name, part.nbytes, int(np.prod(self.shape)) * part.itemsize))
        return part

    sharded_load.TensorReader.__getitem__ = spy

    def load(case, path, save=None, **kw):
        alive = jax.live_arrays()  # held, so no buffer is freed and its address reused during the load
        before = {s.data.unsafe_buffer_pointer() for a in alive for s in a.addressable_shards}
        t0 = time.perf_counter()
        reads.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = jlora.load_hf(path, mesh=mesh, **kw)
        got = _held(model, mesh)
        # tensors of more than 1 KiB read in a piece larger than one device's eighth
        got["whole_reads"] = sorted({n for n, part, whole in reads if whole > 1024 and part * 8 > whole})
        got["device0_live_bytes"] = _device0_live_bytes(before)  # what the load left on device 0
        got["seconds"] = time.perf_counter() - t0
        del alive
        got["warned"] = [str(w.message).split(": ")[1].split(" ")[0] for w in caught]
        single = jlora.load_hf(path, **kw)
        got["nf4_bit_equal"] = _bit_equal(model, single)
        if save:
            np.save(out / f"{save}.npy", np.asarray(model(IDS)))
            np.save(out / f"{save}-single.npy", np.asarray(single(IDS)))
        report[case] = got
        return model, single

    paths = dict(c.split("=", 1) for c in checkpoints)
    for family, path in paths.items():
        model, _ = load(family, path, save=family)
        report[family]["trainer_moves"] = _trainer_moves(model, mesh)
        del model
    path = paths["llama"]
    model, single = load("llama nf4", path, save="llama-nf4", quantize="nf4")
    report["llama nf4"]["trainer_moves"] = _trainer_moves(model, mesh)
    for double in (True, False):
        q = single if double else jlora.load_hf(path, quantize=jlora.NF4Config(double_quant=False))
        bnb = save_quantized(q, out / f"bnb-{double}")
        load("llama bnb checkpoint" + ("" if double else " no double quant"), bnb)
    load("llama nf4 blocksize 256", path, quantize=jlora.NF4Config(blocksize=256))
    # data=2: each distinct shard read once and given to both replicas; the NF4 runs split over fsdp x tensor
    for case, kw in (("llama data=2,fsdp=2,tensor=2", {}), ("llama nf4 data=2,fsdp=2,tensor=2", {"quantize": "nf4"})):
        reads.clear()
        model = jlora.load_hf(path, mesh=make_mesh("data=2,fsdp=2,tensor=2"), **kw)
        report[case] = dict(nf4_bit_equal=_bit_equal(model, jlora.load_hf(path, **kw)),
                            reads=len(reads))
    try:
        jlora.load_hf(path, mesh=make_mesh("fsdp=3", devices=jax.devices()[:3]))
    except ValueError as e:
        report["mesh error"] = str(e)
    (out / "report.json").write_text(json.dumps(report, indent=1))


def _host_main(out: Path, path: str):
    """One of two processes (4 devices each) loading on the global mesh fsdp=8: what it read, and whether the
    gathered arrays equal a load on this process's first device alone."""
    import jax
    from flax import nnx
    from jax.experimental import multihost_utils

    import jlora
    from jlora.convert import sharded_load
    from jlora.train import hosts
    from jlora.train.sharding import make_mesh
    hosts.initialize()
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
    mesh = make_mesh("fsdp=8")
    reads = {}
    read = sharded_load.TensorReader.__getitem__

    def spy(self, index):
        part = read(self, index)
        entry = reads.setdefault(self.name, {"slices": [], "bytes": 0,
                                             "whole_bytes": int(np.prod(self.shape)) * part.itemsize})
        index = index if isinstance(index, tuple) else (index,)
        entry["slices"].append([[s.start, s.stop] for s in index])
        entry["bytes"] += part.nbytes
        return part

    sharded_load.TensorReader.__getitem__ = spy
    report = {}
    for case, kw in (("dense", {}), ("nf4", {"quantize": "nf4"})):
        reads.clear()
        sharded = jlora.load_hf(path, mesh=mesh, **kw)
        leaves = [multihost_utils.process_allgather(a, tiled=True) for a in jax.tree.leaves(nnx.state(sharded))]
        single = jax.tree.leaves(nnx.state(jlora.load_hf(path, **kw)))
        equal = all(np.asarray(a).dtype == np.asarray(b).dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()
                    for a, b in zip(leaves, single, strict=True))
        report[case] = {"bit_equal": equal, "reads": dict(reads)}
    out.write_text(json.dumps(report))


if __name__ == "__main__":
    if sys.argv[1] == "--host":
        _host_main(Path(sys.argv[2]), sys.argv[3])
    else:
        _main(Path(sys.argv[1]), sys.argv[2:])
