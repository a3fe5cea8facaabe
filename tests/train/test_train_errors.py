"""Bad training input: errors name the file and line, and nothing the user wrote is lost."""
import json
import math
import re

import pytest

from jlora.cli import main
from jlora.train.guard import DeadGradient, Guard, NonFiniteLoss


def test_malformed_jsonl_line_is_named(default_base, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello there"}\n{"text": "oops"\n')
    code = main(["train", "--model", str(default_base), "--data", str(data), "--out", str(tmp_path / "r"),
                 "--no-progress"])
    assert code == 2
    assert f"{data}:2" in capsys.readouterr().err


def test_model_without_data_is_refused(default_base, tmp_path, capsys):
    assert main(["train", "--model", str(default_base), "--out", str(tmp_path / "r")]) == 2
    assert "--data is required" in capsys.readouterr().err


def _checkpoints(out):
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


def test_named_last_good_checkpoint_resumes_with_a_finite_loss(tmp_path, capsys):
    # Warmup from lr 0: step 1 leaves the adapters as they were, step 2's update (lr 2e29) explodes them,
    # so step 3's loss is not finite. Checkpoint 2 holds the exploded update; checkpoint 1 is the good one.
    out = tmp_path / "r"
    args = ["train", "--out", str(out), "--steps", "6", "--save-every", "1", "--lr", "1e30", "--warmup-steps", "5",
            "--max-grad-norm", "0", "--eval-every", "0", "--batch-size", "4", "--seq-len", "48", "--no-progress"]
    assert main(args) == 3
    err = capsys.readouterr().err
    match = re.search(r"last good checkpoint \(its next step's loss was finite\) is step (\d+)", err)
    assert "loss became nan" in err and match, err
    good = int(match.group(1))
    assert _checkpoints(out)[-1] == good  # --resume starts there, not at the exploded one

    assert main(args + ["--resume"]) == 3  # the same settings explode again, one step later
    out_text = capsys.readouterr().out
    assert f"resumed from {out / 'checkpoints' / str(good)} at step {good}" in out_text
    losses = {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert math.isfinite(losses[good + 1])  # the step after the named checkpoint is finite


def test_dead_gradient_stops_the_run(tmp_path, capsys):
    # lr 1e6 saturates the tiny model within a few steps: loss stuck at ln(vocab), gradient exactly 0.
    out = tmp_path / "r"
    assert main(["train", "--out", str(out), "--steps", "30", "--lr", "1e6", "--eval-every", "0",
                 "--batch-size", "4", "--seq-len", "48", "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "gradient norm was exactly 0 at steps" in err and "training stopped" in err, err
    assert not (out / "adapter").exists()


def test_non_finite_adapter_weights_are_named():
    with pytest.raises(NonFiniteLoss, match="adapter weights became non-finite in the update of step 3"):
        Guard().check(3, 1.5, 2.0, False, last_good="no good checkpoint was saved")
    guard = Guard(zero_grad_steps=3)
    guard.check(1, 0.0, 0.0, True, last_good="")  # no target tokens: loss 0, gradient 0: not dead
    guard.check(2, 2.0, 0.0, True, last_good="")
    guard.check(3, 2.0, 1e-3, True, last_good="")  # a non-zero gradient resets the count
    guard.check(4, 2.0, 0.0, True, last_good="")
    guard.check(5, 2.0, 0.0, True, last_good="")
    with pytest.raises(DeadGradient, match="exactly 0 at steps 4-6"):
        guard.check(6, 2.0, 0.0, True, last_good="")


def test_updated_weights_that_overflow_are_reported_by_the_step(checkpoint):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    import jlora
    from jlora.train.state import SplitModel
    from jlora.train.step import make_train_step

    model = jlora.get_peft_model(jlora.load_hf(checkpoint("llama")), jlora.LoraConfig(r=2, init_lora_weights=False),
                                 rngs=nnx.Rngs(0))
    split = SplitModel.of(model)
    params = split.params()
    rng = np.random.RandomState(0)
    batch = {k: jnp.asarray(v.astype(np.int32))[None] for k, v in dict(
        inputs=rng.randint(0, 96, (2, 8)), targets=rng.randint(0, 96, (2, 8)), loss_mask=np.ones((2, 8)),
        positions=np.tile(np.arange(8), (2, 1)), segment_ids=np.ones((2, 8))).items()}
    for lr, finite in ((1e-3, True), (float("inf"), False)):  # an update that overflows float32
        tx = optax.sgd(lr)
        new, _, m = jax.jit(make_train_step(split, tx))(dict(params), tx.init(params), split.frozen, batch,
                                                        jax.random.key(0), jnp.asarray(0))
        want = all(np.isfinite(np.asarray(v)).all() for v in new.values())
        assert bool(m["params_finite"]) == want == finite


def _snapshot(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.relative_to(out).parts[0] in ("adapter", "checkpoints", "metrics.jsonl")}


def test_overwrite_touches_nothing_until_the_new_run_is_checked(tmp_path, capsys):
    out = tmp_path / "r"
    previous = tmp_path / "r.previous"
    args = ["train", "--out", str(out), "--steps", "2", "--batch-size", "2", "--seq-len", "48", "--eval-every", "0",
            "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "settings: " in printed and " lr=0.003 " in printed  # the effective settings, demo's lr included
    old = _snapshot(out)
    assert "adapter/adapter_model.safetensors" in old and any(k.startswith("checkpoints/2/") for k in old)
    assert main(args) == 2
    assert "holds another run" in capsys.readouterr().err

    # A typo in --data: refused before anything of the earlier run is moved or deleted.
    typo = tmp_path / "trian.jsonl"
    assert main(args + ["--overwrite", "--model", str(out / "base"), "--data", str(typo)]) == 2
    assert str(typo) in capsys.readouterr().err
    assert _snapshot(out) == old and not previous.exists()

    # A new run that stops before its first checkpoint: the earlier run waits in <out>.previous.
    assert main(args + ["--overwrite", "--lr", "1e30", "--warmup-steps", "0", "--max-grad-norm", "0",
                        "--save-every", "0", "--steps", "4"]) == 3
    assert _snapshot(previous) == old

    # A new run that checkpoints: the earlier one is gone, the new one complete.
    assert main(args + ["--overwrite"]) == 0
    assert not previous.exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert _checkpoints(out) == [2] and (out / "adapter" / "adapter_model.safetensors").exists()


def test_tokenizer_larger_than_model_vocab_is_refused(checkpoint, default_base, tmp_path, capsys):
    import shutil
    model = tmp_path / "m"
    shutil.copytree(checkpoint("llama"), model)  # vocab 96
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_base / f, model / f)  # 512 tokens
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello there"}\n')
    assert main(["train", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "r")]) == 2
    assert "vocab" in capsys.readouterr().err


def test_overwrite_move_cut_short_is_finished_next_time(tmp_path):
    from jlora.train.run_dir import set_aside
    out = tmp_path / "r"
    (out / "checkpoints" / "4").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("{}\n")
    staging = tmp_path / "r.previous.partial"  # a crash after the adapter had moved
    (staging / "adapter").mkdir(parents=True)
    (staging / "adapter" / "adapter_config.json").write_text("{}")
    assert set_aside(out, log=lambda *a: None) == tmp_path / "r.previous"
    moved = tmp_path / "r.previous"
    assert sorted(p.name for p in moved.iterdir()) == ["adapter", "checkpoints", "metrics.jsonl"]
    assert not staging.exists() and not any(out.iterdir())
