"""The round trips every family's tests run, written once: jlora's adapter loaded by PEFT, PEFT's adapter
loaded by jlora, jlora's merged export loaded by transformers. The references are PEFT and transformers,
float32 against their own float64 copies (tests/numerics.float32_close)."""
import json

import numpy as np
import peft
import torch
from flax import nnx

import jlora
from jlora.vllm_rules import check_vllm_adapter
from tests.numerics import float32_close, rel_err, torch_logits32_and_64, transformers_model


def jit_logits(model, ids) -> np.ndarray:
    """jlora's logits as one jitted program (eager op-by-op dispatch compiles every primitive: 3-5x slower)."""
    import jax
    graph, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graph, s)(x))(state, np.asarray(ids)))


def _logits(model, ids, forward):
    return np.asarray((forward or jit_logits)(model, ids))


def jlora_adapter_loads_in_peft(path, lora_kwargs: dict, ids, out_dir, *, seed: int = 7, max_lora_rank=None,
                                forward=None, min_change: float = 1e-4, what: str = ""):
    """jlora's adapter (random, non-zero B) saved to `out_dir`, loaded by PEFT on transformers: the logits equal
    jlora's, and differ from the base's by more than `min_change` (or the check proves nothing). With
    `max_lora_rank`, vLLM's rules accept the adapter. Returns (jlora model, the saved adapter_config.json)."""
    model = jlora.get_peft_model(jlora.load_hf(path), jlora.LoraConfig(init_lora_weights=False, **lora_kwargs),
                                 rngs=nnx.Rngs(seed))
    ours = _logits(model, ids, forward)
    jlora.save_pretrained(model, out_dir)
    if max_lora_rank is not None:
        check_vllm_adapter(out_dir, max_lora_rank=max_lora_rank)
    ref = peft.PeftModel.from_pretrained(transformers_model(path), out_dir).eval()
    want, want64 = torch_logits32_and_64(ref, ids)
    with torch.no_grad(), ref.disable_adapter():
        plain = ref(torch.tensor(np.asarray(ids))).logits.numpy()
    assert rel_err(plain, want) > min_change, "the adapter must change the logits, or this test proves nothing"
    float32_close(ours, want, want64, what=what or f"jlora -> peft {lora_kwargs}")
    return model, json.loads((out_dir / "adapter_config.json").read_text())


def peft_adapter_loads_in_jlora(path, peft_config, ids, out_dir, *, torch_seed: int = 0, forward=None,
                                perturb: str | None = None, what: str = "peft -> jlora"):
    """PEFT's adapter (`peft_config`, init from `torch_seed`) saved to `out_dir`, loaded by jlora.load_adapter:
    jlora's logits equal PEFT's. `perturb`: parameters whose name holds it get noise of half their std first
    (PEFT starts trained copies equal to the base and token deltas at zero, which would prove nothing)."""
    torch.manual_seed(torch_seed)
    ref = peft.get_peft_model(transformers_model(path), peft_config).eval()
    if perturb:
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if perturb in name:
                    p.add_(0.5 * p.std() * torch.randn_like(p))
    ref.save_pretrained(out_dir)
    want, want64 = torch_logits32_and_64(ref, ids)
    model = jlora.load_adapter(jlora.load_hf(path), out_dir)
    float32_close(_logits(model, ids, forward), want, want64, what=what)
    return model


def merged_export_loads_in_transformers(path, lora_kwargs: dict, ids, out_dir, *, seed: int = 1, forward=None,
                                        min_change: float = 1e-4, what: str = "merged", **save_kwargs):
    """jlora's merged model (random adapter) saved to `out_dir` and loaded by transformers: its logits (float32
    and float64) are the reference for jlora's unmerged float32 logits, which differ from the base's."""
    model = jlora.get_peft_model(jlora.load_hf(path), jlora.LoraConfig(init_lora_weights=False, **lora_kwargs),
                                 rngs=nnx.Rngs(seed))
    ours = _logits(model, ids, forward)
    jlora.save_merged(model, out_dir, **save_kwargs)
    merged, merged64 = torch_logits32_and_64(transformers_model(out_dir), ids)
    with torch.no_grad():
        base = transformers_model(path)(torch.tensor(np.asarray(ids))).logits.numpy()
    assert rel_err(base, ours) > min_change, "the adapter must change the logits, or this test proves nothing"
    # the merged weights' own float32 rounding sits inside close32's factor
    float32_close(ours, merged, merged64, what=what)
    return model


def peft_loss_and_lora_grads(ref, batch: dict, dtype):
    """sum(loss_mask * CE) and every adapter gradient (jlora's names and [in, out] layout) of a PEFT model by
    torch autograd in `dtype` (the model is cast to it in place)."""
    ref = ref.to(dtype)
    ref.zero_grad()
    logits = ref(torch.tensor(np.asarray(batch["inputs"]), dtype=torch.long)).logits
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           torch.tensor(np.asarray(batch["targets"]), dtype=torch.long).reshape(-1),
                                           reduction="none")
    loss = (ce * torch.tensor(np.asarray(batch["loss_mask"]), dtype=dtype).reshape(-1)).sum()
    loss.backward()
    grads = {}
    for name, p in ref.named_parameters():
        if p.requires_grad:  # base_model.model.model.layers.1.mlp.down_proj.lora_A.default.weight
            module = name.removeprefix("base_model.model.").split(".lora_")[0]
            grads[f"{module}.lora.{'a' if '.lora_A.' in name else 'b'}"] = p.grad.double().numpy().T
    return loss.item(), grads


def lora_grads_equal_peft(model, path, batch: dict, out_dir, *, chunk_tokens=None, n_grads: int | None = None):
    """The training loss sum(loss_mask * CE) and its adapter gradients through jlora's default path (one jitted
    value_and_grad of the train step's loss over the trainable parameters) equal torch autograd through PEFT on
    transformers (`path`) with jlora's adapter saved to `out_dir`: within PEFT's own float32 error against its
    float64 copy. Every gradient must be non-zero (or the check proves nothing); `n_grads` checks the count."""
    import jax
    from jlora.train.loss import token_loss_sum
    from jlora.train.state import SplitModel
    split = SplitModel.of(model)
    kwargs = {} if chunk_tokens is None else {"chunk_tokens": chunk_tokens}
    value, grads = jax.jit(jax.value_and_grad(
        lambda params: token_loss_sum(split.model(params, split.frozen), batch, **kwargs)[0]))(split.params())
    jlora.save_pretrained(model, out_dir)
    ref = peft.PeftModel.from_pretrained(transformers_model(path), out_dir, is_trainable=True)
    loss32, grads32 = peft_loss_and_lora_grads(ref, batch, torch.float32)
    loss64, grads64 = peft_loss_and_lora_grads(ref, batch, torch.float64)
    float32_close(np.float64(value), np.float64(loss32), np.float64(loss64), what="loss")
    assert set(grads) == set(grads64), sorted(set(grads) ^ set(grads64))
    if n_grads is not None:
        assert len(grads) == n_grads, len(grads)
    for k in grads64:
        assert np.abs(grads64[k]).max() > 0, k
        float32_close(np.asarray(grads[k]), grads32[k], grads64[k], what=k)


def lm_batch(ids, vocab: int, *, seed: int = 9, drop: float = 0.3) -> dict:
    """A training batch of unpacked rows: `ids` as inputs, random targets below `vocab`, a random loss mask
    dropping ~`drop` of the positions, positions 0.., one segment a row."""
    ids = np.asarray(ids)
    rng = np.random.RandomState(seed)
    return dict(inputs=ids, targets=rng.randint(0, vocab, ids.shape),
                loss_mask=(rng.rand(*ids.shape) > drop).astype(np.float32), segment_ids=np.ones_like(ids),
                positions=np.broadcast_to(np.arange(ids.shape[1]), ids.shape))
