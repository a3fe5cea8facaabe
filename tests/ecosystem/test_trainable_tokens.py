"""trainable_token_indices (only some rows of the embedding / head train) against PEFT 0.21's TrainableTokensLayer,
on a tiny Llama whose vocabulary was resized by two special tokens (transformers' resize_token_embeddings):
PEFT loads jlora's export with the same logits, jlora loads PEFT's, the rows' gradients equal PEFT's (float32
against PEFT's float64 copy), one optimizer step changes only those rows, the merged export holds them."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from flax import nnx
from jlora.convert.safetensors_io import tensor_shapes

import jlora
from jlora.train.loss import token_loss_sum
from jlora.train.optimizer import make_optimizer
from jlora.train.state import SplitModel
from jlora.trainable_tokens import TrainableTokens
from jlora.vllm_rules import check_vllm_adapter
from tests.ecosystem.test_modules_to_save import perturbed
from tests.numerics import float32_close, torch_logits32_and_64, transformers_model
from tests.peft_checks import jit_logits, peft_adapter_loads_in_jlora

VOCAB = 96
NEW = [VOCAB, VOCAB + 1]  # the two added special tokens
ROWS = [5, VOCAB + 1]     # one old token, one new
IDS = np.array([[1, 5, VOCAB, 7, VOCAB + 1, 5, 2, VOCAB, 9, 11, 3, VOCAB + 1],
                [VOCAB + 1, 4, 5, 6, VOCAB, 8, 5, 10, 12, 13, 14, 15]])


@pytest.fixture(scope="module")
def resized(tmp_path_factory):
    """resized(tied) -> a tiny Llama checkpoint whose vocabulary grew from 96 to 98 tokens."""
    import transformers

    from tests.conftest import TINY

    paths = {}

    def get(tied: bool):
        if tied not in paths:
            torch.manual_seed(0)
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, "tie_word_embeddings": tied}))
            model.resize_token_embeddings(VOCAB + 2)
            paths[tied] = tmp_path_factory.mktemp(f"resized-{tied}")
            model.save_pretrained(paths[tied])
        return paths[tied]
    return get


def jlora_model(path, indices, seed=1):
    cfg = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                           trainable_token_indices=indices)
    return jlora.get_peft_model(jlora.load_hf(path), cfg, rngs=nnx.Rngs(seed))


CASES = [(False, ROWS), (True, NEW), (False, {"embed_tokens": ROWS, "lm_head": NEW})]


@pytest.mark.parametrize("tied,indices", [CASES[1], pytest.param(*CASES[0], marks=pytest.mark.slow),
                                          pytest.param(*CASES[2], marks=pytest.mark.slow)])
def test_jlora_export_loads_in_peft(tied, indices, resized, tmp_path):
    path = resized(tied)
    model = perturbed(jlora_model(path, indices), TrainableTokens)
    ours = jit_logits(model, IDS)
    jlora.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == indices
    keys = {k: s for k, s in tensor_shapes(tmp_path / "adapter_model.safetensors").items() if "lora" not in k}
    want = {"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": (2, 32)}
    if isinstance(indices, dict):
        want["base_model.model.lm_head.token_adapter.trainable_tokens_delta"] = (2, 32)
    assert keys == want  # a tied head shares the embedding's rows, as PEFT saves them

    ref = peft.PeftModel.from_pretrained(transformers_model(path), tmp_path).eval()
    want32, want64 = torch_logits32_and_64(ref, IDS)
    float32_close(ours, want32, want64, what=f"jlora -> peft tied={tied} trainable_token_indices={indices}")


@pytest.mark.parametrize("tied,indices", [pytest.param(*CASES[1], marks=pytest.mark.slow), CASES[2],
                                          # tied, other rows for the head: PEFT unties them, so does jlora
                                          pytest.param(True, CASES[2][1], marks=pytest.mark.slow)])
def test_peft_adapter_loads_in_jlora(tied, indices, resized, tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                          trainable_token_indices=indices, task_type="CAUSAL_LM")
    peft_adapter_loads_in_jlora(resized(tied), cfg, IDS, tmp_path, forward=jit_logits, perturb="trainable_tokens_delta",
                                what=f"peft -> jlora tied={tied} {indices}")


def _batch(ids):
    t = ids.shape[1] - 1
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((len(ids), t), np.float32),
            "positions": np.broadcast_to(np.arange(t), (len(ids), t)), "segment_ids": np.ones((len(ids), t), np.int32)}


def _peft_row_grads(ref, ids):
    """{saved key: d(sum of token cross-entropies)/d(rows)} of a PEFT model (float32 or a float64 copy)."""
    t = torch.tensor(ids)
    logits = ref(t[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1),
                                             reduction="sum")
    loss.backward()
    return {n.replace(".default", ""): p.grad.double().numpy() for n, p in ref.named_parameters()
            if "trainable_tokens_delta" in n}


@pytest.mark.parametrize("tied,indices", [CASES[1], CASES[2]])
def test_row_gradients_equal_peft(tied, indices, resized, tmp_path):
    import copy

    path = resized(tied)  # the tied case trains the two added tokens' rows, in the embedding and the head
    model = perturbed(jlora_model(path, indices), TrainableTokens)
    jlora.save_pretrained(model, tmp_path)
    ref = peft.PeftModel.from_pretrained(transformers_model(path), tmp_path, is_trainable=True).eval()
    want32 = _peft_row_grads(ref, IDS)
    want64 = _peft_row_grads(copy.deepcopy(ref).double(), IDS)

    split = SplitModel.of(model)
    params = split.params()
    delta = "token_adapter.trainable_tokens_delta"
    names = {f"base_model.model.model.embed_tokens.{delta}": "model.embed_tokens.tokens.rows",
             f"base_model.model.lm_head.{delta}": "lm_head.tokens.rows"}
    # 8 tokens per chunk: the chunked loss (jlora.train.chunked_loss) differentiates the head's rows explicitly
    grads = jax.jit(jax.grad(lambda p: token_loss_sum(split.model(p, split.frozen), _batch(IDS), chunk_tokens=8)[0]))(
        params)
    assert set(want32) == {k for k, v in names.items() if v in params}
    for key, ours in want32.items():
        got = np.asarray(grads[names[key]])
        assert np.abs(got).min(axis=1).max() > 0, "every trained row must get a gradient"
        float32_close(got, ours, want64[key], what=f"d loss / d {key} (tied={tied})")

    # one AdamW step (the trainer's optimizer) on these gradients: only the trained rows move
    tx = make_optimizer(lambda step: 1e-2, max_grad_norm=None)
    new = jax.jit(lambda g, p: optax.apply_updates(p, tx.update(g, tx.init(p), p)[0]))(grads, params)
    assert [k for k in params if "lora" not in k] == sorted(names[k] for k in want32)
    table = jax.jit(lambda p: split.model(p, split.frozen).model.embed_tokens(jnp.arange(VOCAB + 2)))
    before, after = np.asarray(table(params)), np.asarray(table(new))
    rows = indices if isinstance(indices, list) else indices["embed_tokens"]
    others = [i for i in range(VOCAB + 2) if i not in rows]
    np.testing.assert_array_equal(after[others], before[others])  # every other row bit-unchanged
    assert (np.abs(after[rows] - before[rows]).max(axis=1) > 0).all()


@pytest.mark.slow
def test_merged_export_holds_the_rows(resized, tmp_path):
    path = resized(False)
    model = perturbed(jlora_model(path, {"embed_tokens": ROWS, "lm_head": NEW}), TrainableTokens)
    ours = jit_logits(model, IDS)
    jlora.save_merged(model, tmp_path)
    merged, merged64 = torch_logits32_and_64(transformers_model(tmp_path), IDS)
    float32_close(ours, merged, merged64, what="merged export with trained token rows")


def test_bad_input_is_one_line(resized, tmp_path):
    from jlora.train.config import ConfigError, TrainConfig

    with pytest.raises(ValueError, match=r"^trainable_token_indices for embed_tokens: \[98\] are not token ids of "
                                         r"this model \(vocab_size 98: ids 0..97\); resize the vocabulary first$"):
        jlora_model(resized(True), [97, 98])
    with pytest.raises(ValueError, match=r"trainable_token_indices: 'score' is not a module jlora can train"):
        jlora.LoraConfig(trainable_token_indices={"score": [1]})
    with pytest.raises(ConfigError, match=r"^--trainable-token-indices '1,x': expected token ids"):
        TrainConfig(trainable_token_indices="1,x")
    model = jlora_model(resized(True), NEW)
    jlora.save_pretrained(model, tmp_path)
    with pytest.raises(ValueError, match="trainable_token_indices: vLLM loads no trained token rows"):
        check_vllm_adapter(tmp_path, max_lora_rank=8)


def test_export_offers_only_the_merged_model(resized, tmp_path, capsys):
    from jlora.cli import main

    path = resized(True)
    model = perturbed(jlora_model(path, NEW), TrainableTokens)
    jlora.save_pretrained(model, tmp_path / "adapter")
    capsys.readouterr()  # the fixture's transformers progress bars
    assert main(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "trained embedding/head" in err and "--merge" in err and not (tmp_path / "a").exists()
    assert main(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "b"), "--merge", "--base", str(path),
                 "--dtype", "float32"]) == 0
    merged, merged64 = torch_logits32_and_64(transformers_model(tmp_path / "b" / "merged"), IDS)
    float32_close(jit_logits(model, IDS), merged, merged64, what="jlora export --merge with trained token rows")
