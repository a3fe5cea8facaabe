"""Trainable embeddings and output head, as PEFT trains them: full copies and trainable token rows.

`LoraConfig.modules_to_save` (PEFT's `ModulesToSaveWrapper`): `embed_tokens` and/or `lm_head` train as full
copies. The frozen weight is replaced by a `ModulesToSave` variable (a `LoRAParam`, so every adapter
filter -- the trainer's split, the optimizer, checkpoints, parameter counts -- takes it; stored in float32
like the LoRA factors). With tied embeddings (no lm_head module) one copy serves the input lookup and the
head, which is PEFT's `ensure_weight_tying=True` (PEFT's default unties them instead and warns; jlora
writes `ensure_weight_tying: true` so PEFT reproduces jlora's model).

`LoraConfig.trainable_token_indices` (PEFT's `TrainableTokensLayer`): only the rows `idx` of the embedding
(and of the head: tied, as PEFT ties them; untied, when the dict form names `lm_head`) train:

    W' = W with W'[idx] = rows               rows [n, hidden] (torch orientation), initialised to W[idx]
    lookup:  h_t = W'[id_t]                  (a token in idx reads its row, every other W's)
    head:    z = x W'^T,  i.e.  z[..., idx] = x rows^T and the other columns x W^T

PEFT saves the rows as `<module>.token_adapter.trainable_tokens_delta` (the values, not a difference) and
the indices in adapter_config.json. The frozen W is never differentiated: the head's other columns go
through the frozen product and only `x rows^T` reaches the rows' gradient.
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jlora.kernels.mixed_dot import linear as mixed_linear
from jlora.lora_layer import LoRAParam
from jlora.module_patterns import HEAD_MODULES

EMBED, HEAD = HEAD_MODULES
DELTA_KEY = "token_adapter.trainable_tokens_delta"


class ModulesToSave(LoRAParam):
    """A full trained copy of embed_tokens.weight or lm_head.kernel (PEFT's `modules_to_save`)."""


class TrainableTokens(LoRAParam):
    """The trained rows of an embedding or head (PEFT's `trainable_tokens_delta`)."""


class TokenRows(nnx.Module):
    """Rows `indices` of a [vocab, hidden] weight replaced by trainable `rows` (see the module docstring)."""

    def __init__(self, rows, indices):
        self.indices = tuple(int(i) for i in indices)  # static: part of the graph, not of the state
        self.rows = TrainableTokens(jnp.asarray(rows, jnp.float32))

    def lookup(self, ids: jnp.ndarray, h: jnp.ndarray) -> jnp.ndarray:
        """h = W[ids] [..., hidden] with the rows of ids in `indices` taken from `rows` (cast to h's dtype,
        as PEFT's `index_copy` casts them to W's)."""
        hit = ids[..., None] == jnp.asarray(self.indices, ids.dtype)
        new = jnp.take(self.rows[...].astype(h.dtype), jnp.argmax(hit, axis=-1), axis=0)
        return jnp.where(jnp.any(hit, axis=-1)[..., None], new, h)

    def logits(self, x: jnp.ndarray, z: jnp.ndarray, weight_dtype) -> jnp.ndarray:
        """z = x W^T [..., vocab] with the columns `indices` recomputed as x rows^T (rows rounded to W's
        dtype first, then the product in x's dtype, as the frozen head's)."""
        rows = self.rows[...].astype(weight_dtype).astype(x.dtype)
        return z.at[..., jnp.asarray(self.indices)].set(mixed_linear(x, rows, transpose_w=True).astype(z.dtype))


def resolve_token_targets(indices, tied: bool) -> dict[str, tuple[int, ...]]:
    """{module: indices} of PEFT's `trainable_token_indices`: a list targets embed_tokens (and a tied head
    with it); a dict names the modules. On a tied model the head follows embed_tokens, so a dict naming both
    must give them the same indices (PEFT unties them otherwise; jlora does not)."""
    targets = ({EMBED: tuple(indices)} if not isinstance(indices, dict)
               else {k.rsplit(".", 1)[-1]: tuple(v) for k, v in indices.items()})
    if tied and HEAD in targets:
        if EMBED in targets and targets[EMBED] != targets[HEAD]:
            raise ValueError(f"trainable_token_indices {dict(indices)}: with tied embeddings the head is the "
                             f"embedding, so embed_tokens and lm_head need the same indices")
        targets.setdefault(EMBED, targets[HEAD])
        del targets[HEAD]
    return targets


def _full_copy(module, attr: str, where: str) -> None:
    var = getattr(module, attr)
    if isinstance(var, LoRAParam):
        raise ValueError(f"{where} is already trainable")
    setattr(module, attr, ModulesToSave(jnp.asarray(var[...], jnp.float32)))


def add_trainable_embeddings(model, config) -> None:
    """Makes the config's `modules_to_save` and `trainable_token_indices` trainable on `model` (in place)."""
    tied = model.lm_head is None
    emb = model.model.embed_tokens
    saved = set(config.modules_to_save or ())
    if saved:
        if tied or EMBED in saved:
            _full_copy(emb, "weight", "model.embed_tokens")
        if not tied and HEAD in saved:
            _full_copy(model.lm_head, "kernel", "lm_head")
    if config.trainable_token_indices is None:
        return
    vocab = model.config.vocab_size
    for name, idx in resolve_token_targets(config.trainable_token_indices, tied).items():
        bad = [i for i in idx if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"trainable_token_indices for {name}: {bad} are not token ids of this model "
                             f"(vocab_size {vocab}: ids 0..{vocab - 1}); resize the vocabulary first")
        rows = jnp.asarray(idx, jnp.int32)
        if name == EMBED:
            emb.tokens = TokenRows(jnp.take(emb.weight[...], rows, axis=0), idx)
        else:
            model.lm_head.tokens = TokenRows(jnp.take(model.lm_head.kernel[...], rows, axis=1).T, idx)


def untie_head(model) -> None:
    """Gives a model with tied embeddings its own frozen lm_head, a copy of the embedding (its config then says
    tie_word_embeddings=false, so a merged export writes lm_head.weight). PEFT's modules_to_save on a tied base
    without ensure_weight_tying trains embed_tokens and lm_head apart (or one of them, the other keeping the
    base's weight): jlora loads such an adapter on the untied model."""
    import dataclasses
    import json

    from jlora.models.layers import Linear

    c, emb = model.config, model.model.embed_tokens
    head = nnx.eval_shape(lambda: Linear(c.hidden_size, c.vocab_size, use_bias=False, dtype=model.dtype,
                                         param_dtype=emb.weight[...].dtype, init_std=0.0, rngs=nnx.Rngs(0)))
    head.kernel = nnx.Param(jnp.asarray(emb.weight[...]).T)
    model.lm_head = head
    hf = {**c.hf_config, "tie_word_embeddings": False}
    model.config = dataclasses.replace(c, tie_word_embeddings=False, hf_config_json=json.dumps(hf))


class Trained(NamedTuple):
    """One trained embedding/head variable: its PEFT key (without the `base_model.model.` prefix), the
    variable, the module it trains (EMBED or HEAD) and whether the variable is the torch tensor transposed
    (lm_head.kernel is [hidden, vocab], PEFT's lm_head.weight [vocab, hidden])."""
    key: str
    var: nnx.Variable
    module: str
    transposed: bool = False


def trained_variables(model) -> list[Trained]:
    """The model's trained embedding/head variables: full copies (modules_to_save) of embed_tokens.weight and
    lm_head.kernel, then the token rows (trainable_token_indices) of each. The one table `head_is_trainable`,
    `peft_tensors` and `load_peft_tensors` read."""
    emb, head = model.model.embed_tokens, model.lm_head
    modules = [(EMBED, "model.embed_tokens", emb, "weight")]
    if head is not None:
        modules.append((HEAD, "lm_head", head, "kernel"))
    out = [Trained(f"{path}.weight", getattr(m, w), name, transposed=name == HEAD)
           for name, path, m, w in modules if isinstance(getattr(m, w), ModulesToSave)]
    return out + [Trained(f"{path}.{DELTA_KEY}", m.tokens.rows, name)
                  for name, path, m, _ in modules if getattr(m, "tokens", None) is not None]


def head_is_trainable(model) -> bool:
    """Whether the output head has trained weights (a full copy or token rows): the loss must then
    differentiate the head's weights too (`trainable_head`). A tied head is the embedding."""
    head = EMBED if model.lm_head is None else HEAD
    return any(t.module == head for t in trained_variables(model))


def trainable_head(model):
    """(head(params, hidden) -> logits, params): the output head as a function of its trained weights (the
    tied embedding's or lm_head's copy or token rows), for a loss that differentiates it explicitly
    (jlora.train.chunked_loss's `head_params`); None when the head has none."""
    if not head_is_trainable(model):
        return None
    where = nnx.PathContains("embed_tokens" if model.lm_head is None else "lm_head")
    graphdef, params, rest = nnx.split(model, nnx.All(LoRAParam, where), ...)
    return (lambda p, h: nnx.merge(graphdef, p, rest).logits_from_hidden(h)), params


_EMBED_COPY, _TIED_HEAD_KEY = "model.embed_tokens.weight", "lm_head.weight"  # a tied copy is saved under both


def _tied_copy(model, table: list[Trained]) -> bool:
    """Whether the model ties its head to a trained full copy of the embedding (saved under both keys)."""
    return model.lm_head is None and any(t.key == _EMBED_COPY for t in table)


def peft_tensors(model, prefix: str) -> dict[str, np.ndarray]:
    """PEFT key -> float32 array (torch orientation) of the trained embedding and head weights.

    A tied full copy is written under both keys, as PEFT's ensure_weight_tying save does."""
    table = trained_variables(model)
    tied = _tied_copy(model, table)
    out = {}
    for t in table:
        value = np.asarray(t.var[...], np.float32)
        out[f"{prefix}{t.key}"] = value.T if t.transposed else value
        if tied and t.key == _EMBED_COPY:
            out[f"{prefix}{_TIED_HEAD_KEY}"] = value
    return out


def load_peft_tensors(model, tensors: dict[str, np.ndarray], where: str) -> set[str]:
    """Sets the trained embedding/head weights from PEFT tensors keyed without the `base_model.model.`
    prefix; returns the keys used. A tied model takes one copy: a head copy that differs from the
    embedding's is PEFT's untied training (ensure_weight_tying=false), which jlora cannot represent."""
    table = trained_variables(model)
    want = {t.key: tuple(t.var.shape[::-1] if t.transposed else t.var.shape) for t in table}
    tied_head = _tied_copy(model, table)
    if tied_head:
        want[_TIED_HEAD_KEY] = want[_EMBED_COPY]
        if _TIED_HEAD_KEY in tensors and not np.array_equal(tensors[_TIED_HEAD_KEY], tensors.get(_EMBED_COPY)):
            raise ValueError(f"{where}: lm_head.weight differs from model.embed_tokens.weight, but the base ties "
                             f"them: PEFT trained them apart (ensure_weight_tying=false); jlora keeps them tied")
    for key, need in want.items():
        if key not in tensors:
            if key == _TIED_HEAD_KEY and tied_head:
                continue
            raise ValueError(f"{where}: adapter lacks {key}, which its config trains")
        shape = tuple(np.shape(tensors[key]))
        if shape != need:
            raise ValueError(f"{where}: {key} has shape {shape}, the model needs {need}; was it "
                             f"trained on another base model (or before resizing the vocabulary)?")
    for t in table:
        value = jnp.asarray(np.asarray(tensors[t.key], np.float32))
        t.var.set_value(value.T if t.transposed else value)
    return {k for k in want if k in tensors}


def merged_rows(model, hf_name: str, value: np.ndarray) -> np.ndarray:
    """The HF tensor `hf_name` (torch orientation) with its trained token rows written in (cast to its
    dtype, as PEFT's merge does); other tensors unchanged."""
    emb, head = model.model.embed_tokens, model.lm_head
    module = emb if hf_name == "model.embed_tokens.weight" else head if hf_name == "lm_head.weight" else None
    tokens = getattr(module, "tokens", None)
    if tokens is None:
        return value
    value = np.array(value)
    value[list(tokens.indices)] = np.asarray(tokens.rows[...]).astype(value.dtype)
    return value

