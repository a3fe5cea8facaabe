"""Several LoRA adapters in one batch: each row runs the base with its own adapter (or none), as vLLM's
punica kernels and S-LoRA do, by gathering per-row A and B.

    for a projection, adapters k = 1..n (0 = none) stacked with their ranks padded to r = max r_k:
        A [n + 1, in, r]   A[k, :, :r_k] = A_k, zero elsewhere (A[0] = 0)
        B [n + 1, r, out]  B[k, :r_k, :] = B_k, zero elsewhere
        s [n + 1]          s[k] = scaling_k
    y_row = x_row W + b + s[k_row] * (x_row A[k_row]) B[k_row]          (k_row: the row's adapter index)

The padding is exact: the extra columns of x A are 0 and meet zero rows of B. The rank-r path runs in
float32, as jlora.lora_layer.LoRA does; the frozen projections take the plain jnp path (use_kernels(None)).
The row indices are a Variable of the model (`set_rows`), so changing them needs no new compilation; rows
past their length (the decode loop's filler rows) use index 0.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jlora.convert.peft_adapter import load_adapter
from jlora.models.layers import use_kernels
from jlora.peft_model import adapted_modules, linear_modules
from jlora.trainable_tokens import ModulesToSave, TrainableTokens


class MultiLoRA(nnx.Module):
    """Per-row low-rank updates `s[k] * (x A[k]) B[k]` (the `lora` of a Linear in a multi-adapter model)."""

    def __init__(self, a: np.ndarray, b: np.ndarray, scaling: np.ndarray):
        self.a = nnx.Variable(jnp.asarray(a, jnp.float32))        # [n + 1, in, r]
        self.b = nnx.Variable(jnp.asarray(b, jnp.float32))        # [n + 1, r, out]
        self.scaling = nnx.Variable(jnp.asarray(scaling, jnp.float32))  # [n + 1]
        self.rows = nnx.Variable(jnp.zeros((1,), jnp.int32))      # adapter index per batch row
        self.r = int(a.shape[-1])
        self.dropout = nnx.data(None)  # read by Linear: never active here

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x [batch, ..., in] -> [batch, ..., out] in float32."""
        rows = self.rows[...]
        k = jnp.pad(rows, (0, x.shape[0] - rows.shape[0])) if rows.shape[0] < x.shape[0] else rows[:x.shape[0]]
        x = x.astype(jnp.float32)
        h = jnp.einsum("b...i,bir->b...r", x, self.a[...][k])
        y = jnp.einsum("b...r,bro->b...o", h, self.b[...][k])
        return y * self.scaling[...][k].reshape((-1,) + (1,) * (y.ndim - 1))


def build(base, adapters: Mapping[str, str | Path], *, allow_pickle: bool = False):
    """(a model running `adapters` per row on `base`'s arrays, the adapter names in index order 1..n).

    `base` must carry no adapter; it is not changed (the new model shares its frozen arrays). Each adapter
    loads through jlora.load_adapter (PEFT, Unsloth or jlora; another base's adapter fails its shape check).
    """
    if not adapters:
        raise ValueError("adapters must name at least one adapter dir, e.g. {'a': 'runs/a/adapter'}")
    if next(adapted_modules(base), None) is not None:
        raise ValueError("adapters= needs the base model without LoRA (this one already carries an adapter); "
                         "load the base again with jlora.load_hf")
    names = list(adapters)
    graphdef, state = nnx.split(base)
    models = [load_adapter(nnx.merge(graphdef, state), adapters[n], allow_pickle=allow_pickle) for n in names]
    copies = [n for n, m in zip(names, models) if jax.tree.leaves(nnx.state(m, ModulesToSave, TrainableTokens))]
    if copies:
        raise ValueError(f"adapters {copies} also train the embedding or the head (modules_to_save / "
                         "trainable_token_indices): multi-adapter generation gathers only LoRA A/B per row; "
                         "generate with one of them alone (jlora.load_adapter)")
    loaded = [dict(adapted_modules(m)) for m in models]
    dora = [n for n, found in zip(names, loaded) if any(m.lora.magnitude is not None for m in found.values())]
    if dora:
        raise ValueError(f"adapters {dora} are DoRA adapters (use_dora): multi-adapter generation runs plain LoRA "
                         f"only; generate with one of them alone, or from its merged model (jlora.save_merged)")
    model = use_kernels(nnx.merge(graphdef, state), None)
    for name, module in linear_modules(model):
        parts = [(k + 1, m.lora) for k, found in enumerate(loaded) if (m := found.get(name)) is not None]
        if not parts:
            continue
        r = max(lora.r for _, lora in parts)
        a = np.zeros((len(names) + 1, module.in_features, r), np.float32)
        b = np.zeros((len(names) + 1, r, module.out_features), np.float32)
        s = np.zeros((len(names) + 1,), np.float32)
        for k, lora in parts:
            a[k, :, :lora.r] = np.asarray(lora.a[...], np.float32)
            b[k, :lora.r, :] = np.asarray(lora.b[...], np.float32)
            s[k] = lora.scaling
        module.lora = MultiLoRA(a, b, s)
    return model, names


def row_indices(names: Sequence[str], adapter_ids: Sequence[str | None], rows: int) -> np.ndarray:
    """Each row's adapter index (0 = none); an id that names no adapter is an error listing the names."""
    if len(adapter_ids) != rows:
        raise ValueError(f"adapter_ids has {len(adapter_ids)} entries, expected one per prompt ({rows})")
    out = []
    for i, a in enumerate(adapter_ids):
        if a is not None and a not in names:
            raise ValueError(f"adapter_ids[{i}] = {a!r} names no adapter; adapters: {', '.join(names)} "
                             "(or None for the base model)")
        out.append(0 if a is None else names.index(a) + 1)
    return np.asarray(out, np.int32)


def set_rows(model, indices) -> None:
    """Sets the per-row adapter indices of every MultiLoRA in `model`."""
    indices = jnp.asarray(indices, jnp.int32)
    for _, module in nnx.iter_graph(model):
        if isinstance(module, MultiLoRA):
            module.rows.set_value(indices)
