"""Llama-family causal LM in Flax NNX, with module names that mirror transformers'.

The NNX path `model/layers/0/self_attn/q_proj/kernel` is the HF tensor `model.layers.0.self_attn.q_proj.weight`
(transposed), so converters and target matching use HF names directly.

    h = embed(ids);  for each layer: h += attn(rms(h));  h += mlp(rms(h));  logits = rms(h) @ W_head
    attn: softmax(q k^T / sqrt(d) + mask) v with rotary q, k and grouped kv heads
    mlp:  down(silu(gate(x)) * up(x))
"""
from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

from flax import nnx

from jlora.attention import DEFAULT_BACKEND as DEFAULT_ATTENTION
from jlora.attention import attend
from jlora.attention import attention_mask as attention_mask  # re-exported: jlora.llama.attention_mask
from jlora.kernels.dispatch import auto_impl
from jlora.kernels.mixed_dot import linear as mixed_linear
from jlora.llama_config import LlamaConfig
from jlora.lora_layer import LoRA
from jlora.nf4 import NF4Tensor
from jlora.nf4_weight import nf4_matmul
from jlora.remat import call_layer
from jlora.rope import apply_rotary, cos_sin, inverse_frequencies

Dtype = jnp.dtype


# A new model's path: dense bases through lora_linear(impl="xla") (custom VJP over XLA dots: GSPMD-partitionable,
# fastest measured on CPU); NF4 bases through nf4_matmul + LoRA, whose dequantize is ordered so that only one
# layer's dense weight is alive at a time (the fused NF4 op's XLA path does not order it).
DEFAULT_KERNELS = "default"


def _dropout_active(lora: LoRA) -> bool:
    return lora.dropout is not None and not lora.dropout.deterministic


@functools.cache
def _warn_dropout_skips_kernels(impl: str, rate: float) -> None:
    """Once per (impl, rate): the Pallas/Triton kernels do not apply dropout, so those projections skip them."""
    if impl in (DEFAULT_KERNELS, "xla") or (impl == "auto" and auto_impl(False) == "xla"):
        return  # the XLA path with dropout is the same ops, split: nothing is lost
    warnings.warn(f"lora_dropout={rate}: the fused {impl!r} kernels do not apply dropout, so while training the "
                  f"adapted projections run as XLA ops instead (set lora_dropout=0 to use the kernels)",
                  stacklevel=3)


class Linear(nnx.Module):
    """A frozen projection `x @ kernel + bias` (kernel [in, out]) with an optional LoRA adapter.

    `kernel` is an `nnx.Param` [in, out], or after `jlora.quantize_model` an `NF4Weight` holding the
    weight in torch orientation [out, in] as bitsandbytes stores it (see jlora/qlora.py).

    Paths (`kernel_impl`, set by `use_kernels`):
    - DEFAULT_KERNELS (every backend and dtype): an adapted dense projection is one custom-VJP op
      (`jlora.kernels.lora_linear`, impl="xla": the frozen product and the rank-r path on 2-D rows, no
      dW); an unadapted one is `jlora.kernels.mixed_dot.linear` (16-bit operands stay native in the
      forward and input-gradient dots); an NF4 one is `nf4_matmul` + `LoRA.__call__`. With active LoRA
      dropout the frozen product and the adapter run as separate ops.
    - "auto" / "pallas" / "triton": the fused kernels for adapted projections (see jlora.kernels).
    - None: the plain jnp path, `x @ kernel + bias + lora(x)` by ordinary autodiff: the reference.
    Each rounds `frozen + low-rank` to the compute dtype once; the low-rank part is computed in the
    adapters' dtype (float32), as PEFT does (the Pallas/Triton kernels: in the compute dtype).
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, dtype: Dtype,
                 param_dtype: Dtype, init_std: float, rngs: nnx.Rngs):
        self.in_features, self.out_features = in_features, out_features
        kernel = jax.random.normal(rngs.params(), (in_features, out_features), jnp.float32) * init_std
        self.kernel = nnx.Param(kernel.astype(param_dtype))
        self.bias = nnx.data(nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None)
        self.dtype = dtype
        self.lora: LoRA | None = nnx.data(None)
        self.kernel_impl: str | None = DEFAULT_KERNELS  # `use_kernels`: auto | xla | pallas | triton | None
        self.kernel_mesh = None              # set by `use_kernels`: run the kernel per device over this mesh
        self.row_parallel = False            # o_proj / down_proj: input axis split over tensor

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = x.astype(self.dtype)
        kernel = self.kernel.get_value()
        impl = self.kernel_impl
        if impl is None:
            return self._plain(x, kernel)
        nf4_default = impl == DEFAULT_KERNELS and isinstance(kernel, NF4Tensor)
        if self.lora is not None and not _dropout_active(self.lora) and not nf4_default:
            return self._fused(x, kernel)
        if self.lora is not None and _dropout_active(self.lora):
            _warn_dropout_skips_kernels(impl, self.lora.dropout.rate)
        return self._unfused(x, kernel, mixed_linear)

    def _plain(self, x: jnp.ndarray, kernel) -> jnp.ndarray:
        """The reference: plain jnp ops and ordinary autodiff (dW included when asked for)."""
        return self._unfused(x, kernel, lambda x, w: x @ w.astype(self.dtype))

    def _unfused(self, x: jnp.ndarray, kernel, dense_matmul) -> jnp.ndarray:
        """y = x W + b + lora(x) as separate ops; `dense_matmul(x, W)` is the product for a dense kernel."""
        if isinstance(kernel, NF4Tensor):
            y = nf4_matmul(x, kernel)
        else:
            y = dense_matmul(x, kernel)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            y = (y + self.lora(x)).astype(self.dtype)
        return y

    def _fused(self, x: jnp.ndarray, kernel) -> jnp.ndarray:
        """The same y through jlora.kernels (frozen matmul and low-rank path in one op, no dW)."""
        from jlora import kernels

        a, b = self.lora.a[...], self.lora.b[...]
        impl = "xla" if self.kernel_impl == DEFAULT_KERNELS else self.kernel_impl
        op = kernels.nf4_lora_linear if isinstance(kernel, NF4Tensor) else kernels.lora_linear
        w = kernel if isinstance(kernel, NF4Tensor) else kernel.astype(self.dtype)
        mesh = self.kernel_mesh
        if mesh is not None and mesh.size > 1:
            from jlora.kernel_sharding import sharded_lora_linear
            y = sharded_lora_linear(op, x, w, a, b, scale=self.lora.scaling, impl=impl, mesh=mesh,
                                    row_parallel=self.row_parallel)
        else:
            y = op(x, w, a, b, scale=self.lora.scaling, impl=impl)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """weight * (x / sqrt(mean(x^2) + eps)), normalised in float32 as transformers does."""

    def __init__(self, features: int, *, eps: float, dtype: Dtype, param_dtype: Dtype):
        self.weight = nnx.Param(jnp.ones((features,), param_dtype))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * x32.astype(self.dtype)


class Embedding(nnx.Module):
    def __init__(self, vocab: int, features: int, *, dtype: Dtype, param_dtype: Dtype, init_std: float,
                 rngs: nnx.Rngs):
        emb = jax.random.normal(rngs.params(), (vocab, features), jnp.float32) * init_std
        self.weight = nnx.Param(emb.astype(param_dtype))
        self.dtype = dtype

    def __call__(self, ids: jnp.ndarray) -> jnp.ndarray:
        return jnp.take(self.weight[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jnp.ndarray) -> jnp.ndarray:
        """Tied output head: x @ weight^T (16-bit operands stay native, jlora.kernels.mixed_dot)."""
        return mixed_linear(x, self.weight[...].astype(self.dtype), transpose_w=True)


class Attention(nnx.Module):
    """Grouped-query attention with rotary q, k; `attention` (set by jlora.attention.use_attention) picks the
    backend: "auto" | "blockwise" | "reference" (jlora.attention.backends)."""

    def __init__(self, config: LlamaConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        c = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, init_std=c.initializer_range, rngs=rngs)
        self.q_proj = Linear(c.hidden_size, c.q_features, use_bias=c.qkv_bias, **kw)
        self.k_proj = Linear(c.hidden_size, c.kv_features, use_bias=c.qkv_bias, **kw)
        self.v_proj = Linear(c.hidden_size, c.kv_features, use_bias=c.qkv_bias, **kw)
        self.o_proj = Linear(c.q_features, c.hidden_size, use_bias=c.o_bias, **kw)
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.sliding_window = c.sliding_window
        self.dtype = dtype
        self.attention = DEFAULT_ATTENTION
        self.attention_blocks = None  # jlora.attention.BlockSizes, None: its default

    def __call__(self, x, cos, sin, segment_ids):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        group = self.heads // self.kv_heads
        q = q.reshape(b, t, self.kv_heads, group, self.head_dim)
        out = attend(q, k, v, segment_ids, backend=self.attention, sliding_window=self.sliding_window,
                     scale=self.head_dim ** -0.5, block_sizes=self.attention_blocks)
        return self.o_proj(out.reshape(b, t, self.heads * self.head_dim))


class MLP(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        c = config
        kw = dict(use_bias=c.mlp_bias, dtype=dtype, param_dtype=param_dtype, init_std=c.initializer_range,
                  rngs=rngs)
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, **kw)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, **kw)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        norm = dict(eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, **norm)
        self.self_attn = Attention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)
        self.mlp = MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, h, cos, sin, mask):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                      init_std=config.initializer_range, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)


class LlamaForCausalLM(nnx.Module):
    """`model(input_ids, positions=None, segment_ids=None) -> logits [batch, seq, vocab]`.

    positions restart at 0 for each packed example; segment_ids (0 = padding) keep packed examples
    from attending to each other. `remat` (a jlora.remat policy name; True = "full") sets what each decoder layer's backward recomputes.
    """

    def __init__(self, config: LlamaConfig, *, dtype="float32", param_dtype=None, rngs: nnx.Rngs):
        dtype = jnp.dtype(dtype)
        param_dtype = jnp.dtype(param_dtype or dtype)
        self.config = config
        self.dtype = dtype
        self.remat = False
        self.model = LlamaModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if config.tie_word_embeddings:
            self.lm_head = nnx.data(None)
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
                                  param_dtype=param_dtype, init_std=config.initializer_range, rngs=rngs)

    def hidden_states(self, input_ids, positions=None, segment_ids=None):
        """Final-normed hidden states [batch, seq, hidden]."""
        input_ids = jnp.asarray(input_ids)
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        cos, sin = cos_sin(jnp.asarray(positions), inverse_frequencies(self.config))
        mask = jnp.asarray(segment_ids)  # each layer's attention masks by these (jlora.attention.masks)
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = call_layer(layer, self.remat, h, cos, sin, mask)
        return self.model.norm(h)

    def logits_from_hidden(self, h):
        if self.lm_head is None:
            return self.model.embed_tokens.attend(h)
        return self.lm_head(h)

    def __call__(self, input_ids, positions=None, segment_ids=None):
        return self.logits_from_hidden(self.hidden_states(input_ids, positions, segment_ids))


def init_random(config: LlamaConfig, *, dtype="float32", seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised model (normal(0, initializer_range) weights, unit norms)."""
    return LlamaForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(seed))


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


def abstract_model(config: LlamaConfig, *, dtype="float32") -> LlamaForCausalLM:
    """The model with ShapeDtypeStruct leaves: no memory, for loading and for real-size shape checks."""
    return nnx.eval_shape(lambda: LlamaForCausalLM(config, dtype=dtype, rngs=_ShapeOnlyKeys()))




def use_kernels(model: nnx.Module, impl: str | None = "auto", *, mesh=None) -> nnx.Module:
    """Routes every adapted projection through `jlora.kernels` (`impl`: auto | xla | pallas | triton), or
    through the plain jnp reference path with None. A new model already runs DEFAULT_KERNELS;
    call this to force another backend. Projections with active LoRA dropout run their frozen product
    and adapter as separate XLA ops (a warning says so once when a Pallas/Triton kernel is skipped).

    mesh: the (data, fsdp, tensor) mesh the model trains on (jlora.train.sharding.make_mesh). Pallas and
    Triton kernels are opaque to XLA's partitioner, so on several devices each kernel runs per device
    under shard_map (jlora.kernel_sharding); without a mesh they need one device.
    """
    from jlora.kernels import IMPLS
    from jlora.mesh_axes import ROW_PARALLEL_MODULES

    if impl is not None and impl not in IMPLS:
        raise ValueError(f"kernel impl {impl!r} is not one of {list(IMPLS)} (or None for the plain path)")
    for path, module in nnx.iter_graph(model):
        if isinstance(module, Linear):
            module.kernel_impl = impl
            module.kernel_mesh = mesh
            module.row_parallel = bool(path) and path[-1] in ROW_PARALLEL_MODULES
    return model
