"""The decoder, written once for every family, in Flax NNX with module names that mirror transformers'.

    h = embed(ids) [* embedding_scale];  for each layer i (LayerSpec s_i):
        Llama:     h += attn_i(rms(h));                 h += mlp(rms(h))
        sandwich:  h += post_attn_rms(attn_i(rms(h)));  h += post_ff_rms(mlp(pre_ff_rms(h)))     (Gemma2/3)
    logits = softcap(rms(h) @ W_head)          (W_head = embed^T when tied; softcap only when configured)

The NNX path `model/layers/0/self_attn/q_proj/kernel` is the HF tensor `model.layers.0.self_attn.q_proj.weight`
(transposed); jlora.convert.hf_names maps them from the config's flags.

With sandwich norms the HF names are Gemma2's: `input_layernorm` (before attention),
`post_attention_layernorm` (on the attention output, before the residual add: NOT the pre-MLP norm it is
in Llama), `pre_feedforward_layernorm`, `post_feedforward_layernorm`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jlora.models.attention import Attention
from jlora.models.config import ModelConfig
from jlora.models.family import LayerSpec
from jlora.models.layers import MLP, Embedding, Linear, RMSNorm
from jlora.models.rope import rope_tables
from jlora.models.stacked import is_stacked, scan_option
from jlora.remat import call_layer

Dtype = jnp.dtype


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, spec: LayerSpec | None = None, *, dtype: Dtype, param_dtype: Dtype,
                 rngs: nnx.Rngs):
        norm = dict(eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, offset=config.norm_weight_offset)
        self.input_layernorm = RMSNorm(config.hidden_size, **norm)
        self.self_attn = Attention(config, spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)
        self.sandwich = config.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, **norm)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, **norm)
        self.mlp = MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    @property
    def rope(self) -> str:
        """Which rope table this layer's attention uses (LayerSpec.rope)."""
        return self.self_attn.rope

    def __call__(self, h, cos, sin, mask, cache=None):
        """h -> h; with a KV cache (generation) h -> (h, cache)."""
        attn = self.self_attn(self.input_layernorm(h), cos, sin, mask, *(() if cache is None else (cache,)))
        attn, cache = (attn, None) if cache is None else attn
        if self.sandwich:
            h = h + self.post_attention_layernorm(attn)
            h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        else:
            h = h + attn
            h = h + self.mlp(self.post_attention_layernorm(h))
        return h if cache is None else (h, cache)


class DecoderModel(nnx.Module):
    """`model.*` in HF names: embed_tokens, layers, norm."""

    def __init__(self, config: ModelConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                      init_std=config.initializer_range, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for spec in config.layer_specs])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype,
                            offset=config.norm_weight_offset)


class CausalLM(nnx.Module):
    """`model(input_ids, positions=None, segment_ids=None) -> logits [batch, seq, vocab]`.

    positions restart at 0 for each packed example; segment_ids (0 = padding) keep packed examples
    from attending to each other. `remat` (a jlora.remat policy name; True = "full") sets what each decoder
    layer's backward recomputes.
    """

    def __init__(self, config: ModelConfig, *, dtype="float32", param_dtype=None, rngs: nnx.Rngs):
        dtype = jnp.dtype(dtype)
        param_dtype = jnp.dtype(param_dtype or dtype)
        self.config = config
        self.dtype = dtype
        self.remat = False
        self.model = DecoderModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if config.tie_word_embeddings:
            self.lm_head = nnx.data(None)
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
                                  param_dtype=param_dtype, init_std=config.initializer_range, rngs=rngs)

    def hidden_states(self, input_ids, positions=None, segment_ids=None, cache=None):
        """Final-normed hidden states [batch, seq, hidden]; with `cache` (jlora.generate.cache.KVCache) the
        layers write their k, v into it and this returns (hidden states, cache)."""
        input_ids = jnp.asarray(input_ids)
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        tables = rope_tables(self.config, jnp.asarray(positions))
        mask = jnp.asarray(segment_ids)  # each layer's attention masks by these (jlora.attention.masks)
        h = self.model.embed_tokens(input_ids)
        if self.config.embedding_scale is not None:
            h = h * jnp.asarray(self.config.embedding_scale, h.dtype)  # rounded to the dtype, as transformers
        if is_stacked(self):  # scanned layers (jlora.models.stacked): one compiled body for every layer
            if cache is None:
                return self.model.norm(self.model.layers(h, tables, mask, self.remat))
            h, cache = self.model.layers(h, tables, mask, self.remat, cache)  # the cache rides in the scan
            return self.model.norm(h), cache
        for i, layer in enumerate(self.model.layers):
            cos, sin = tables.get(layer.rope, tables["global"])
            if cache is None:
                h = call_layer(layer, self.remat, h, cos, sin, mask)
            else:
                h, cache = layer(h, cos, sin, mask, cache.at_layer(i))
        return self.model.norm(h) if cache is None else (self.model.norm(h), cache)

    def logits_from_hidden(self, h):
        logits = self.model.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)
        tokens = getattr(self.lm_head, "tokens", None)  # an untied head's trainable rows (jlora.trainable_tokens)
        if tokens is not None:
            logits = tokens.logits(h.astype(self.lm_head.dtype), logits, self.lm_head.kernel[...].dtype)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = jnp.tanh(logits / cap) * cap
        return logits

    def __call__(self, input_ids, positions=None, segment_ids=None):
        return self.logits_from_hidden(self.hidden_states(input_ids, positions, segment_ids))


LlamaForCausalLM = CausalLM  # the name of the only model class before families
LlamaModel = DecoderModel


def init_random(config: ModelConfig, *, dtype="float32", seed: int = 0) -> CausalLM:
    """A randomly initialised model (normal(0, initializer_range) weights, unit norm scales)."""
    return CausalLM(config, dtype=dtype, rngs=nnx.Rngs(seed))


class _ShapeOnlyKeys:
    """Stands in for nnx.Rngs when only shapes matter: `params()` folds a Python counter into a key.

    Under nnx.eval_shape every nnx.Rngs draw updates its counter Variable, whose set_value asks the tracer
    for a sharding and walks the whole trace so far: building a 70B model cost time quadratic in its
    number of layers (15 s, against 1.9 s with these keys). The values are never used.
    """

    def __init__(self):
        self.count = 0

    def params(self):
        self.count += 1
        return jax.random.fold_in(jax.random.key(0), self.count)


@scan_option  # abstract_model(config, scan_layers=True): layers stacked (jlora/models/stacked.py)
def abstract_model(config: ModelConfig, *, dtype="float32") -> CausalLM:
    """The model with ShapeDtypeStruct leaves: no memory, for loading and for real-size shape checks."""
    return nnx.eval_shape(lambda: CausalLM(config, dtype=dtype, rngs=_ShapeOnlyKeys()))
