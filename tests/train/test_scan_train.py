"""Training with scanned layers (`--scan-layers`, the default where nothing needs the loop).

- a run with scanned layers writes the loop run's metrics.jsonl: every step's loss and gradient norm
  within float32 rel 1e-5 (the same operations per layer, in the same order), tiny Llama (period 1) and
  a 5-layer Gemma 2 (period 2 plus a looped tail layer; slow);
- auto (unset) scans, and loops with a one-line note where a setting needs the loop; `--scan-layers`
  with such a setting is an error naming both; DoRA, modules_to_save and trainable tokens give the loop's
  gradients on a scanned model (so auto scans with them; slow);
- a checkpoint of one layout resumes in the other exactly (adapters and AdamW moments mapped row by row);
- SIGKILL + `--resume` of a scanned run is bit-equal to the uninterrupted run (slow; the loop's own
  resume test, with dropout, is tests/train/test_resume.py).
"""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from jlora.train.config import ConfigError, TrainConfig
from jlora.train.scan_layers import decide

GEMMA2 = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=256, rms_norm_eps=1e-6, sliding_window=6, query_pre_attn_scalar=24,
              num_hidden_layers=5, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
LLAMA = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=3, max_position_embeddings=256, rms_norm_eps=1e-5)


def _base(family: str, out):
    """A tiny random transformers checkpoint with the bundled tokenizer (its vocab), ready for `jlora train`."""
    import transformers
    from jlora.default.tokenizer import build_tokenizer
    from tests.hf_checkpoints import save_random_model
    vocab = build_tokenizer(out)
    if family == "gemma2":
        config = transformers.Gemma2Config(vocab_size=vocab, **GEMMA2)
        return save_random_model(config, out, norm_mean=0.0, norm_std=0.5, weight_std=0.25)
    return save_random_model(transformers.LlamaConfig(vocab_size=vocab, **LLAMA), out)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from tests.hf_checkpoints import built_once
    return built_once(tmp_path_factory, _base, "scan-train")


def _train(out, model, **settings):
    from jlora.default import dataset_paths
    from jlora.train.trainer import Trainer
    lines = []
    config = TrainConfig(out=str(out), model=str(model), data=str(dataset_paths()[0]), steps=4, batch_size=4,
                         seq_len=48, packing=True, dtype="float32", lr=3e-3, warmup_steps=1, eval_every=0,
                         save_every=0, progress=False, **settings)
    Trainer(config, log=lambda *a, **k: lines.append(" ".join(map(str, a)))).run()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return records, "\n".join(lines)


def _assert_same_metrics(scan, loop):
    assert [r["step"] for r in scan] == [r["step"] for r in loop] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "lr", "target_tokens"):
        a, b = np.array([r[key] for r in scan]), np.array([r[key] for r in loop])
        assert np.all(np.abs(a - b) <= 1e-5 * np.abs(b)), (key, a, b)
    assert loop[-1]["loss"] < loop[0]["loss"]  # it trained


@pytest.mark.parametrize("family", ["llama", pytest.param("gemma2", marks=pytest.mark.slow)])
def test_scanned_run_writes_the_loop_runs_metrics(family, base, tmp_path):
    scan, scan_log = _train(tmp_path / "scan", base(family), scan_layers=True)  # (auto loops on CPU)
    loop, loop_log = _train(tmp_path / "loop", base(family), scan_layers=False)
    assert "layers: scanned (" in scan_log and "layers: scanned" not in loop_log
    if family == "gemma2":
        assert "2 scanned groups of 2 + 1 looped" in scan_log
    _assert_same_metrics(scan, loop)


FEATURES = {"dora": dict(use_dora=True), "modules_to_save": dict(modules_to_save=["embed_tokens", "lm_head"]),
            "trainable_tokens": dict(trainable_token_indices=[1, 5, 7])}


@pytest.mark.slow  # three loop/scan pairs of jitted gradients (~30 s each under load)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_feature_on_a_scanned_model_gives_the_loops_gradients(feature, checkpoint):
    """Why auto scans with DoRA and trainable embeddings: every trainable parameter's gradient on the scanned
    model equals the loop model's (whose gradients equal PEFT's: tests/ecosystem), float32 rel <= 1e-5."""
    import jax
    from flax import nnx

    import jlora
    from jlora.models.stacked import is_stacked, unstack_layers
    from jlora.train.loss import token_loss_sum
    ids = np.random.RandomState(8).randint(0, 96, (2, 12))
    rng = np.random.RandomState(9)
    batch = dict(inputs=ids, targets=rng.randint(0, 96, ids.shape), loss_mask=(rng.rand(*ids.shape) > 0.3) * 1.0,
                 segment_ids=np.ones_like(ids), positions=np.broadcast_to(np.arange(12), ids.shape))

    def grads(model):
        graph, params, rest = nnx.split(model, nnx.LoRAParam, ...)
        g = jax.jit(jax.grad(lambda p: token_loss_sum(nnx.merge(graph, p, rest), batch, chunk_tokens=None)[0]))(params)
        nnx.update(model, g)
        unstack_layers(model)  # read by the loop's names
        return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}

    config = jlora.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **FEATURES[feature])
    loop = jlora.get_peft_model(jlora.load_hf(checkpoint("llama")), config, rngs=nnx.Rngs(3))
    scanned = jlora.get_peft_model(jlora.load_hf(checkpoint("llama"), scan_layers=True), config, rngs=nnx.Rngs(3))
    assert is_stacked(scanned)
    want, got = grads(loop), grads(scanned)
    assert want.keys() == got.keys()
    for k in want:
        assert np.abs(want[k]).max() > 0, k
        assert np.abs(got[k] - want[k]).max() <= 1e-5 * np.abs(want[k]).max(), k


def test_auto_loops_with_a_note_where_a_setting_needs_it():
    for platform in ("tpu", "gpu"):
        assert decide(TrainConfig(), platform) == (True, None)
        assert decide(TrainConfig(scan_layers=False), platform) == (False, None)
        scan, note = decide(TrainConfig(lora_dropout=0.1), platform)
        assert not scan and note.startswith("layers: the loop model") and "--lora-dropout 0.1" in note
        assert "\n" not in note
    # On CPU auto loops (the scanned step is slower there); --scan-layers still scans.
    scan, note = decide(TrainConfig(), "cpu")
    assert not scan and note.startswith("layers: the loop model (on CPU") and "\n" not in note
    assert decide(TrainConfig(scan_layers=True), "cpu") == (True, None)
    assert decide(TrainConfig(scan_layers=False), "cpu") == (False, None)
    with pytest.raises(ConfigError, match="--scan-layers cannot be combined with --lora-dropout 0.1"):
        decide(TrainConfig(scan_layers=True, lora_dropout=0.1))


def test_checkpoint_resumes_in_the_other_layout_exactly(tmp_path):
    """A scanned run's train state (adapters + AdamW moments, period 2, 5 layers: 2 groups and a tail)
    restored into a loop run's structure is the same numbers row by row, and back."""
    import jax
    import optax
    from jlora.train.checkpoints import Checkpoints
    rng = np.random.RandomState(0)
    scanned = {"model.layers.group.0.mlp.up_proj.lora.a": rng.randn(2, 8, 4), "model.layers.group.1.mlp.up_proj.lora.a":
               rng.randn(2, 8, 4), "model.layers.tail.0.mlp.up_proj.lora.a": rng.randn(8, 4),
               "lm_head.lora.b": rng.randn(4, 6)}
    scanned = {k: jax.numpy.asarray(v, jax.numpy.float32) for k, v in scanned.items()}
    tx = optax.adamw(1e-2)
    opt = tx.update(scanned, tx.init(scanned), scanned)[1]  # non-zero moments
    loop_name = {0: ("group.0", 0), 1: ("group.1", 0), 2: ("group.0", 1), 3: ("group.1", 1), 4: ("tail.0", None)}

    def row(tree, i):
        where, g = loop_name[i]
        x = tree[f"model.layers.{where}.mlp.up_proj.lora.a"]
        return x if g is None else x[g]
    loop = {f"model.layers.{i}.mlp.up_proj.lora.a": row(scanned, i) for i in range(5)} | {"lm_head.lora.b": scanned["lm_head.lora.b"]}
    loop_opt = tx.init(loop)
    ckpt = Checkpoints(tmp_path / "ckpt")
    ckpt.save(1, {"params": scanned, "opt_state": opt}, {"step": 1})
    got, meta = ckpt.restore(1, {"params": loop, "opt_state": loop_opt})
    assert meta["step"] == 1 and got["params"].keys() == loop.keys()
    mu = got["opt_state"][0].mu
    for i in range(5):
        name = f"model.layers.{i}.mlp.up_proj.lora.a"
        assert np.array_equal(got["params"][name], row(scanned, i)), name
        assert np.array_equal(mu[name], row(opt[0].mu, i)) and np.abs(mu[name]).max() > 0, name
    ckpt.save(2, {"params": loop, "opt_state": got["opt_state"]}, {"step": 2})
    back, _ = ckpt.restore(2, {"params": scanned, "opt_state": opt})
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves({"params": scanned, "opt_state": opt})):
        assert np.array_equal(a, b)
    ckpt.close()


ARGS = ["--steps", "8", "--save-every", "4", "--batch-size", "4", "--grad-accum", "2", "--seq-len", "48",
        "--eval-every", "0", "--no-progress"]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _command(out, *extra):
    return [sys.executable, "-m", "jlora.cli", "train", "--out", str(out), *ARGS, "--scan-layers", *extra]


def _losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow  # three runs of the demo model in subprocesses (~1 min under load)
def test_sigkill_then_resume_of_a_scanned_run_is_bit_equal(tmp_path, run_until_checkpoint):
    full = subprocess.run(_command(tmp_path / "full"), env=ENV, capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]
    assert "layers: scanned (" in full.stdout

    killed = tmp_path / "killed"
    [(rc, _, err)] = run_until_checkpoint([_command(killed)], [ENV], killed / "checkpoints" / "4")
    assert rc == -signal.SIGKILL, err[-2000:]
    assert not (killed / "adapter").exists()
    resumed = subprocess.run(_command(killed, "--resume"), env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "layers: scanned (" in resumed.stdout
    want, got = _losses(tmp_path / "full"), _losses(killed)
    assert list(got) == list(range(1, 9))
    assert got == want  # bit-equal floats
