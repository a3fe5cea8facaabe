"""modules_to_save (full trained copies of embed_tokens / lm_head) against PEFT 0.21's ModulesToSaveWrapper:
PEFT loads jlora's export and gives the same logits, jlora loads PEFT's, the merged export holds the copies,
and the trainer's split and checkpoints carry them. Tied embeddings: one copy, PEFT's ensure_weight_tying."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx
from jlora.convert.safetensors_io import CheckpointError, tensor_shapes

import jlora
from jlora.train.state import SplitModel
from jlora.trainable_tokens import ModulesToSave
from jlora.vllm_rules import check_vllm_adapter
from tests.numerics import (
    float32_close,
    rel_err,
    torch_logits32_and_64,
    transformers_model,
)
from tests.peft_checks import jit_logits, peft_adapter_loads_in_jlora

IDS = np.random.RandomState(3).randint(0, 96, (2, 12))
PREFIX = "base_model.model."


def perturbed(model, kind=ModulesToSave, seed=0, scale=0.5):
    """Adds noise (scale x each weight's std) to every variable of `kind`: trained copies that differ from the
    base, so a loader that ignores them fails the logits check."""
    rng = np.random.RandomState(seed)
    for _, v in nnx.to_flat_state(nnx.state(model, kind)):
        x = np.asarray(v.get_value())
        v.set_value(jnp.asarray(x + scale * x.std() * rng.randn(*x.shape).astype(np.float32)))
    return model


def jlora_model(path, seed=1, **kwargs):
    cfg = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **kwargs)
    return jlora.get_peft_model(jlora.load_hf(path), cfg, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("family,saved", [
    ("llama", ["embed_tokens", "lm_head"]),
    pytest.param("llama", ["lm_head"], marks=pytest.mark.slow),
    pytest.param("llama-tied", ["embed_tokens", "lm_head"], marks=pytest.mark.slow),
    ("llama-tied", ["embed_tokens"])])
def test_jlora_export_loads_in_peft(family, saved, checkpoint, tmp_path):
    path = checkpoint(family)
    model = perturbed(jlora_model(path, modules_to_save=saved))
    ours = jit_logits(model, IDS)
    jlora.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    keys = tensor_shapes(tmp_path / "adapter_model.safetensors")
    tied = family == "llama-tied"
    assert config["modules_to_save"] == (["embed_tokens", "lm_head"] if tied else saved)
    assert config.get("ensure_weight_tying", False) == tied
    want_keys = {f"{PREFIX}model.embed_tokens.weight" for m in saved if m == "embed_tokens" or tied}
    want_keys |= {f"{PREFIX}lm_head.weight" for m in saved if m == "lm_head" or tied}
    assert {k for k in keys if "lora" not in k} == want_keys and all(keys[k] == (96, 32) for k in want_keys)

    ref = peft.PeftModel.from_pretrained(transformers_model(path), tmp_path).eval()
    want, want64 = torch_logits32_and_64(ref, IDS)
    float32_close(ours, want, want64, what=f"jlora -> peft {family} modules_to_save={saved}")
    if tied:  # a PEFT that drops ensure_weight_tying loads two untied copies, equal: the same model
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "ensure_weight_tying": False}))
        untied = peft.PeftModel.from_pretrained(transformers_model(path), tmp_path).eval()
        float32_close(ours, *torch_logits32_and_64(untied, IDS), what="without ensure_weight_tying")
    with torch.no_grad():
        lora_only = peft.PeftModel.from_pretrained(transformers_model(path), _without_copies(tmp_path, config))
        assert rel_err(lora_only(torch.tensor(IDS)).logits.numpy(), want) > 1e-2  # the copies matter


def _without_copies(adapter_dir, config):
    """The same adapter with modules_to_save dropped (config and tensors): the LoRA part alone."""
    from safetensors.numpy import load_file, save_file
    out = adapter_dir / "lora_only"
    out.mkdir()
    tensors = {k: v for k, v in load_file(adapter_dir / "adapter_model.safetensors").items() if "lora" in k}
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": None,
                                                         "ensure_weight_tying": False}))
    return out


@pytest.mark.parametrize("family", [pytest.param("llama", marks=pytest.mark.slow), "llama-tied"])
def test_peft_adapter_loads_in_jlora(family, checkpoint, tmp_path):
    path = checkpoint(family)
    tied = family == "llama-tied"
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                          modules_to_save=["embed_tokens", "lm_head"], ensure_weight_tying=tied, task_type="CAUSAL_LM")
    peft_adapter_loads_in_jlora(path, cfg, IDS, tmp_path, forward=jit_logits, perturb="modules_to_save",
                                what=f"peft -> jlora {family} modules_to_save")


@pytest.mark.slow
def test_merged_export_holds_the_copies(checkpoint, tmp_path):
    path = checkpoint("llama-tied")
    model = perturbed(jlora_model(path, modules_to_save=["embed_tokens"]))
    ours = jit_logits(model, IDS)
    jlora.save_merged(model, tmp_path)
    merged, merged64 = torch_logits32_and_64(transformers_model(tmp_path), IDS)
    float32_close(ours, merged, merged64, what="merged export with a trained tied embedding")


def test_trainer_split_steps_and_checkpoints_the_copies(checkpoint, tmp_path):
    from jlora.train.checkpoints import Checkpoints
    from jlora.train.optimizer import make_optimizer
    from jlora.train.step import make_train_step

    model = jlora_model(checkpoint("llama"), modules_to_save=["embed_tokens", "lm_head"])
    split = SplitModel.of(model)
    params = split.params()
    assert {"model.embed_tokens.weight", "lm_head.kernel"} <= set(params)
    assert jlora.trainable_parameters(model)[0] == sum(int(np.prod(p.shape)) for p in params.values())
    tx = make_optimizer(lambda step: 1e-2, max_grad_norm=None)
    opt_state = tx.init(params)
    batch = {"inputs": IDS[None, :, :-1], "targets": IDS[None, :, 1:], "loss_mask": np.ones((1, 2, 11), np.float32),
             "positions": np.broadcast_to(np.arange(11), (1, 2, 11)), "segment_ids": np.ones((1, 2, 11), np.int32)}
    step = jax.jit(make_train_step(split, tx, loss_chunk_tokens=8))  # chunks: the head copy is differentiated
    new, opt_state, _ = step(params, opt_state, split.frozen, batch, jax.random.key(0), jnp.asarray(0))
    for name in ("model.embed_tokens.weight", "lm_head.kernel"):
        assert not np.array_equal(new[name], params[name]), f"{name} did not train"
    unused = sorted(set(range(96)) - set(IDS[:, :-1].ravel()))  # never looked up: no gradient reaches the row
    np.testing.assert_array_equal(np.asarray(new["model.embed_tokens.weight"])[unused],
                                  np.asarray(params["model.embed_tokens.weight"])[unused])
    ckpt = Checkpoints(tmp_path / "ckpt")
    ckpt.save(1, {"params": new, "opt_state": opt_state}, {"step": 1})
    restored, _ = ckpt.restore(1, {"params": new, "opt_state": opt_state})
    ckpt.close()
    for name in ("model.embed_tokens.weight", "lm_head.kernel"):
        np.testing.assert_array_equal(restored["params"][name], new[name])


def test_bad_input_is_one_line(checkpoint, tmp_path):
    from jlora.train.config import ConfigError, TrainConfig

    with pytest.raises(ValueError, match=r"modules_to_save: 'score' is not a module jlora can train; expected one "
                                         r"of \['embed_tokens', 'lm_head'\]"):
        jlora.LoraConfig(modules_to_save=["score"])
    with pytest.raises(ConfigError, match=r"^--modules-to-save 'embed,lm_head': expected a comma list of "
                                          r"embed_tokens, lm_head; found \['embed'\]$"):
        TrainConfig(modules_to_save="embed,lm_head")
    with pytest.raises(ValueError, match="in modules_to_save and trainable_token_indices"):
        jlora.LoraConfig(modules_to_save=["embed_tokens"], trainable_token_indices=[3])
    # a tied copy that differs from the embedding's, with ensure_weight_tying: no model PEFT would build
    path = checkpoint("llama-tied")
    model = perturbed(jlora_model(path, modules_to_save=["embed_tokens"]))
    jlora.save_pretrained(model, tmp_path)
    from safetensors.numpy import load_file, save_file
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors[f"{PREFIX}lm_head.weight"] = tensors[f"{PREFIX}lm_head.weight"] + 1.0
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lm_head.weight differs from model.embed_tokens.weight") as e:
        jlora.load_adapter(jlora.load_hf(path), tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("saved", [["embed_tokens"], pytest.param(["embed_tokens", "lm_head"], marks=pytest.mark.slow)])
def test_peft_untied_training_on_a_tied_base_loads_untied(saved, checkpoint, tmp_path):
    """PEFT's default on a tied base (no ensure_weight_tying) trains the embedding apart from the head (which keeps
    the base's weight, or trains its own copy): jlora loads it on an untied model, and the merged export says so."""
    path = checkpoint("llama-tied")
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="ensure_weight_tying"):  # PEFT warns about this setup itself
        ref = peft.get_peft_model(transformers_model(path), peft.LoraConfig(
            r=2, target_modules=["q_proj"], modules_to_save=saved, init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.5 * p.std() * torch.randn_like(p))
    ref.eval().save_pretrained(tmp_path / "adapter")
    want, want64 = torch_logits32_and_64(ref, IDS)
    model = jlora.load_adapter(jlora.load_hf(path), tmp_path / "adapter")
    assert model.lm_head is not None and not model.config.tie_word_embeddings
    ours = jit_logits(model, IDS)
    float32_close(ours, want, want64, what=f"peft (untied on a tied base) -> jlora {saved}")
    jlora.save_merged(model, tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    float32_close(ours, *torch_logits32_and_64(transformers_model(tmp_path / "merged"), IDS), what="merged, untied")


def test_vllm_check_says_to_serve_the_merged_model(checkpoint, tmp_path):
    model = jlora_model(checkpoint("llama"), modules_to_save=["lm_head"])
    jlora.save_pretrained(model, tmp_path)
    with pytest.raises(ValueError, match=r"modules_to_save=\['lm_head'\]: vLLM only accepts classifier/score; "
                                         r"serve the merged model"):
        check_vllm_adapter(tmp_path, max_lora_rank=8)


@pytest.mark.parametrize("family", ["llama", "llama-tied"])
def test_parameter_counts_equal_peft(family, checkpoint):
    path = checkpoint(family)
    for ours, theirs in ((dict(modules_to_save=["embed_tokens", "lm_head"]),
                          dict(modules_to_save=["embed_tokens", "lm_head"],
                               ensure_weight_tying=family == "llama-tied")),
                         (dict(trainable_token_indices=[3, 7]), dict(trainable_token_indices=[3, 7]))):
        model = jlora.get_peft_model(jlora.load_hf(path), jlora.LoraConfig(r=4, target_modules=["q_proj"], **ours),
                                     rngs=nnx.Rngs(0))
        ref = peft.get_peft_model(transformers_model(path), peft.LoraConfig(r=4, target_modules=["q_proj"], **theirs))
        assert jlora.trainable_parameters(model) == tuple(ref.get_nb_trainable_parameters()), (family, ours)
