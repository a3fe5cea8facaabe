"""Memory of a train step from abstract evaluation alone (no compiler): for GPUs, and to rank suggestions.

    per device = arguments (exact: every array's shard)
               + f32 gradient accumulator and gradient (2 x adapter bytes, sharded like the adapters)
               + saved activations of this device's rows
               + with remat: one layer's saved activations again (recomputed during its backward)
               + the f32 gradients of one layer's attention scores and probabilities

"Saved activations" are the residuals of `jax.vjp(loss, adapters)` for one row, found in the jaxpr:
the intermediates the backward pass reads, not counting the arguments themselves. Rows split over
data x fsdp; residuals that are not hidden-size vectors (attention scores, MLP and q/k/v
projections, logits) also split over tensor, since their heads / features / vocab are sharded there.
XLA can fuse some away or need more for temporaries, so this is an estimate, marked as one wherever
it is shown. Against libtpu's v5e compiles (fast effort) of Llama 3.2 1B (seq 512 to 2560, no remat) and
3.1 8B (seq 2048, remat) it came within -20% to +5%.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jlora.llama_config import LlamaConfig
from jlora.memory import ADAPTER_BYTES_PER_PARAM, STEP_GRADIENT_BYTES_PER_PARAM, array_bytes
from jlora.plan.arguments import BATCH_KEYS, trace_safe_split
from jlora.train.loss import token_loss_sum


def _aval_bytes(aval) -> int:
    return array_bytes(aval.shape, aval.dtype)


def saved_activation_bytes(model: nnx.Module, *, batch_size: int, seq_len: int) -> tuple[int, int, int]:
    """(hidden-size residuals, other residuals) in bytes for the backward of one micro-batch, and the
    element count of the largest attention-score array (one layer's [.., T, T])."""
    split = trace_safe_split(model)
    hidden = model.config.hidden_size
    batch = {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32) for k in BATCH_KEYS}

    def residuals(params, frozen, batch):
        def loss(p):
            return token_loss_sum(split.model(p, frozen), batch)[0]
        return jax.vjp(loss, params)[1]

    jaxpr = jax.make_jaxpr(residuals)(split.params(), split.frozen, batch).jaxpr
    inputs = set(jaxpr.invars)
    seen, replicated, sharded, scores = set(), 0, 0, 0
    for v in jaxpr.outvars:
        if not hasattr(v, "aval") or type(v).__name__ == "Literal" or v in inputs or v in seen:
            continue
        seen.add(v)
        shape = v.aval.shape
        if len(shape) >= 4 and shape[-2:] == (seq_len, seq_len):
            # Attention scores: autodiff keeps four [.., T, T] arrays per layer (mask, masked f32 scores,
            # f32 and bf16 probabilities); XLA's fusions keep about one bf16 copy (calibrated on v5e).
            sharded += math.prod(shape) // 2
            scores = max(scores, math.prod(shape))
        elif len(shape) <= 2 or shape[-1] in (hidden, 1):
            replicated += _aval_bytes(v.aval)
        else:
            sharded += _aval_bytes(v.aval)
    return replicated, sharded, scores


@dataclasses.dataclass
class ActivationModel:
    """Saved activations as (replicated, tensor-sharded) bytes: per row of seq_len tokens and independent
    of the rows (copies of weights, e.g. adapters cast to the compute dtype), without and with remat;
    and the elements of one layer's attention scores for one row."""
    none: tuple[float, float]
    full: tuple[float, float]
    const_none: tuple[float, float]
    const_full: tuple[float, float]
    layers: int
    scores: int = 0

    @classmethod
    def measure(cls, build, config: LlamaConfig, *, seq_len: int) -> "ActivationModel":
        """Traces 1- and 2-layer copies of the model (`build(config)` -> abstract model) on 1 and 2 rows and
        extrapolates: every decoder layer and every row saves the same residuals, so

            saved(L, rows) = c + (L - 1) * layer + rows * (r + (L - 1) * layer_row)

        is exact, and 2-layer traces take seconds where an 80-layer one takes minutes.
        """
        layers = config.num_hidden_layers
        per_row, const, scores = {}, {}, 0
        for remat in (False, True):
            saved = {}
            for n in (1, 2):
                model = build(dataclasses.replace(config, num_hidden_layers=n))
                model.remat = remat
                for rows in (1, 2):
                    *bytes_, largest = saved_activation_bytes(model, batch_size=rows, seq_len=seq_len)
                    saved[n, rows] = bytes_
                    scores = max(scores, largest // rows)

            def at(rows):  # L layers, extrapolated from 1 and 2
                return [a + (layers - 1) * (b - a) for a, b in zip(saved[1, rows], saved[2, rows])]
            one, two = at(1), at(2)
            per_row[remat] = tuple(float(b - a) for a, b in zip(one, two))
            const[remat] = tuple(float(max(2 * a - b, 0)) for a, b in zip(one, two))
        return cls(per_row[False], per_row[True], const[False], const[True], layers, scores)

    def bytes(self, *, rows: float, remat: bool, tensor: int = 1, fsdp: int = 1) -> float:
        """Activation bytes on one device holding `rows` rows of a (., fsdp, tensor) mesh."""
        def per_device(pair):
            return pair[0] + pair[1] / tensor
        const = sum(self.const_full if remat else self.const_none) / (fsdp * tensor)  # follow their weights
        backward = 2 * 4 * self.scores / tensor  # f32 gradients of one layer's scores and probabilities
        if not remat:
            return rows * (per_device(self.none) + backward) + const
        one_layer = [max(n - f, 0.0) / self.layers for n, f in zip(self.none, self.full)]
        return rows * (per_device(self.full) + per_device(one_layer) + backward) + const


def estimate_bytes_per_device(argument_bytes: int, adapter_bytes: int, activations: ActivationModel, *,
                              rows_per_device: float, remat: bool, tensor: int = 1, fsdp: int = 1) -> int:
    """The estimate of the module docstring, for one device."""
    # float32 accumulator + this micro-batch's gradient (jlora/memory.py): 2 x the float32 adapters
    grads = adapter_bytes * STEP_GRADIENT_BYTES_PER_PARAM // ADAPTER_BYTES_PER_PARAM
    acts = activations.bytes(rows=rows_per_device, remat=remat, tensor=tensor, fsdp=fsdp)
    return int(argument_bytes + grads + acts)
