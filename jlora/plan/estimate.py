"""Memory of a train step from abstract evaluation alone (no compiler): for GPUs, to rank suggestions, and to
seed `--max-seq-len` before compiles confirm it.

    per device = arguments (exact: every array's shard)
               + f32 gradient accumulator and gradient (2 x adapter bytes, sharded like the adapters)
               + saved activations of this device's rows under the remat policy (device memory)
               + under any remat policy: one layer's saved activations again (recomputed during its backward)
               + attention's transient: reference: the f32 gradients of one layer's [T, T] scores and
                 probabilities; blockwise: a few f32 [heads, block_q, block_k] tiles; splash: none (VMEM)
               + the loss's transient: f32 logits and their gradient for one chunk of `loss_chunk_tokens`
                 tokens (the whole rows x T when the loss is not chunked)
    host       = the residuals the "offload" policy keeps in pinned host memory (the layer inputs)

"Saved activations" are the residuals of `jax.vjp(loss, adapters)` for one row, found in the jaxpr: the
intermediates the backward pass reads, not counting the arguments themselves, under the model's attention
backend and remat policy (residuals in host memory, `float32<host>[...]`, are counted apart). Rows split
over data x fsdp; residuals that are not hidden-size vectors (attention scores, MLP and q/k/v projections,
logits) also split over tensor, since their heads / features / vocab are sharded there. With blockwise or
splash attention and the chunked loss nothing of size T x T or T x vocab is saved, so every term but the
arguments is linear in T. XLA can fuse some away or need more for temporaries, so this is an estimate,
marked as one wherever it is shown. Against libtpu's v5e compiles (fast effort) of Llama 3.2 1B (seq 512 to
2560, no remat, reference attention) and 3.1 8B (seq 2048, remat) it came within -20% to +5%.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jlora.attention import BlockSizes
from jlora.llama_config import LlamaConfig
from jlora.memory import ADAPTER_BYTES_PER_PARAM, STEP_GRADIENT_BYTES_PER_PARAM, array_bytes
from jlora.plan.arguments import BATCH_KEYS, trace_safe_split
from jlora.remat import POLICIES
from jlora.train.chunked_loss import DEFAULT_CHUNK_TOKENS
from jlora.train.loss import token_loss_sum


def _aval_bytes(aval) -> int:
    return array_bytes(aval.shape, aval.dtype)


def _on_host(aval) -> bool:
    space = getattr(aval, "memory_space", None)
    return space is not None and "host" in str(space).lower()


def saved_activation_bytes(model: nnx.Module, *, batch_size: int, seq_len: int,
                           chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS) -> tuple[int, int, int, int]:
    """(hidden-size residuals, other residuals) in device bytes for the backward of one micro-batch, the
    element count of the largest attention-score array (one layer's [.., T, T]; 0 when none is saved), and
    the residual bytes in host memory."""
    split = trace_safe_split(model)
    hidden = model.config.hidden_size
    batch = {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32) for k in BATCH_KEYS}

    def residuals(params, frozen, batch):
        def loss(p):
            return token_loss_sum(split.model(p, frozen), batch, chunk_tokens=chunk_tokens)[0]
        return jax.vjp(loss, params)[1]

    jaxpr = jax.make_jaxpr(residuals)(split.params(), split.frozen, batch).jaxpr
    inputs = set(jaxpr.invars)
    seen, replicated, sharded, scores, host = set(), 0, 0, 0, 0
    for v in jaxpr.outvars:
        if not hasattr(v, "aval") or type(v).__name__ == "Literal" or v in inputs or v in seen:
            continue
        seen.add(v)
        shape = v.aval.shape
        if _on_host(v.aval):
            host += _aval_bytes(v.aval)
        elif len(shape) >= 4 and shape[-2:] == (seq_len, seq_len):
            # Attention scores: the reference backend's backward keeps the probabilities in the compute
            # dtype (jlora.attention.reference), tanh(s / cap) too under a soft cap.
            sharded += _aval_bytes(v.aval)
            scores = max(scores, math.prod(shape))
        elif len(shape) <= 2 or shape[-1] in (hidden, 1):
            replicated += _aval_bytes(v.aval)
        else:
            sharded += _aval_bytes(v.aval)
    return replicated, sharded, scores, host


@dataclasses.dataclass
class ActivationModel:
    """Saved activations per remat policy as (replicated, tensor-sharded) device bytes, per row of seq_len
    tokens and independent of the rows (copies of weights, e.g. adapters cast to the compute dtype); host
    bytes per row; and what the transients need (score elements of one layer and row, the attention
    backend and its blocks, the loss chunk, the vocabulary)."""
    per_row: dict            # policy -> (replicated, sharded)
    const: dict              # policy -> (replicated, sharded)
    host_per_row: dict       # policy -> bytes in host memory
    layers: int
    scores: int = 0
    seq_len: int = 0
    vocab: int = 0
    heads: int = 0
    attention: str = "reference"
    blocks: BlockSizes | None = None
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS

    @property
    def none(self):
        return self.per_row["none"]

    @property
    def full(self):
        return self.per_row["full"]

    @classmethod
    def measure(cls, build, config: LlamaConfig, *, seq_len: int, policies=POLICIES, attention: str = "reference",
                chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS, blocks: BlockSizes | None = None
                ) -> "ActivationModel":
        """Traces 1- and 2-layer copies of the model (`build(config)` -> abstract model, with the attention
        backend set) on 1 and 2 rows and extrapolates: every decoder layer and every row saves the same
        residuals, so

            saved(L, rows) = c + (L - 1) * layer + rows * (r + (L - 1) * layer_row)

        is exact, and 2-layer traces take seconds where an 80-layer one takes minutes. `policies` must
        include "none" and "full" (the recompute term is one layer's difference of the two).
        """
        layers = config.num_hidden_layers
        policies = tuple(dict.fromkeys(("none", "full", *policies)))
        models = {n: build(dataclasses.replace(config, num_hidden_layers=n)) for n in (1, 2)}
        per_row, const, host, scores = {}, {}, {}, 0
        for policy in policies:
            saved = {}
            for n, model in models.items():
                model.remat = policy
                for rows in (1, 2):
                    *device, largest, on_host = saved_activation_bytes(model, batch_size=rows, seq_len=seq_len,
                                                                       chunk_tokens=chunk_tokens)
                    saved[n, rows] = (*device, on_host)
                    scores = max(scores, largest // rows)

            def at(rows):  # L layers, extrapolated from 1 and 2
                return [a + (layers - 1) * (b - a) for a, b in zip(saved[1, rows], saved[2, rows])]
            one, two = at(1), at(2)
            per_row[policy] = tuple(float(b - a) for a, b in zip(one[:2], two[:2]))
            const[policy] = tuple(float(max(2 * a - b, 0)) for a, b in zip(one[:2], two[:2]))
            host[policy] = float(two[2] - one[2])
        return cls(per_row, const, host, layers, scores, seq_len=seq_len, vocab=config.vocab_size,
                   heads=config.num_attention_heads, attention=attention, blocks=blocks, chunk_tokens=chunk_tokens)

    def transient(self, *, rows: float, tensor: int = 1) -> float:
        """Bytes that exist only while one layer's backward or the loss runs (see the module docstring)."""
        if self.scores:
            attention = rows * 2 * 4 * self.scores / tensor  # f32 gradients of one layer's scores and probs
        elif self.attention == "blockwise":
            b = self.blocks or BlockSizes.get_default()
            attention = rows * 4 * 4 * self.heads * min(b.q, self.seq_len) * min(b.k, self.seq_len) / tensor
        else:
            attention = 0.0  # splash keeps its tiles in VMEM
        tokens = rows * self.seq_len
        chunk = tokens if self.chunk_tokens is None else min(self.chunk_tokens, tokens)
        return attention + 2 * 4 * chunk * self.vocab / tensor

    def bytes(self, *, rows: float, remat, tensor: int = 1, fsdp: int = 1) -> float:
        """Device bytes of activations on one device holding `rows` rows of a (., fsdp, tensor) mesh."""
        policy = _policy(remat)

        def per_device(pair):
            return pair[0] + pair[1] / tensor
        const = sum(self.const[policy]) / (fsdp * tensor)  # follow their weights
        saved = per_device(self.per_row[policy])
        if policy != "none":
            saved += per_device([max(n - f, 0.0) / self.layers for n, f in zip(self.none, self.full)])
        return rows * saved + self.transient(rows=rows, tensor=tensor) + const

    def host_bytes(self, *, rows: float, remat) -> float:
        """Host bytes on one device holding `rows` rows (the offloaded layer inputs; hidden-size, replicated
        over tensor)."""
        return rows * self.host_per_row.get(_policy(remat), 0.0)


def _policy(remat) -> str:
    return {True: "full", False: "none"}.get(remat, remat) if isinstance(remat, bool) else remat


def estimate_bytes_per_device(argument_bytes: int, adapter_bytes: int, activations: ActivationModel, *,
                              rows_per_device: float, remat, tensor: int = 1, fsdp: int = 1) -> int:
    """The device estimate of the module docstring, for one device."""
    # float32 accumulator + this micro-batch's gradient (jlora/memory.py): 2 x the float32 adapters
    grads = adapter_bytes * STEP_GRADIENT_BYTES_PER_PARAM // ADAPTER_BYTES_PER_PARAM
    acts = activations.bytes(rows=rows_per_device, remat=remat, tensor=tensor, fsdp=fsdp)
    return int(argument_bytes + grads + acts)
