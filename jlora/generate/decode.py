"""Token-level generation: left-pad a batch, prefill the cache in one jitted call, then decode in a jitted
loop, stopping each row at its first end-of-sequence token.

    prompts [b] of lengths n_b  ->  ids [b, P] left-padded  (P: the longest prompt rounded up to a bucket)
    prefill:  h, cache = model.hidden_states(ids, positions, segments, cache=empty);  token_0 = pick(logits(h[:, -1]))
    decode:   token_s = pick(logits(model(token_{s-1} at slot P + s - 1)))   for s = 1 .. N - 1
              (a lax.while_loop: one compiled step for every token, ended early when every row has stopped)
    a row stops after emitting an eos id; later slots of that row hold pad and are not returned

Static shapes: the prefill compiles once per (batch, P, max_len) and the decode loop once per (batch,
max_len) and sampling settings, with the batch a power of two (filler rows start done and are dropped),
P a power of two >= 16 and max_len (the cache length) P + N - 1 rounded up to a multiple of 64, so batch
sizes, prompt lengths and token budgets reuse a few compilations. The
sampling settings (jlora.generate.sampler) are static, the seed and the step bound are traced (a new seed
or streaming token by token reuse the compiled loop); logits are processed in float32.

Several processes (a model whose arrays span other hosts' devices, as `jlora train` holds it): every process
calls generate_tokens with the same prompts and settings, so all run the same jitted calls in the same order
(SPMD). The host inputs are placed replicated over the params' mesh, and what the host reads (the step, the
done flags, the tokens) is gathered to every process, so each takes the same loop branches.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jlora.dora import inference_split
from jlora.generate.cache import KVCache
from jlora.generate.sampler import SamplingConfig, next_tokens
from jlora.models.stacked import is_stacked
from jlora.models.structure_cache import StructureCache

MIN_BUCKET = 16  # short prompts share one prefill shape; buckets double after it (a padded slot costs a token of prefill)
CACHE_MULTIPLE = 64


@dataclasses.dataclass(frozen=True)
class TokenOutput:
    """One row's result: the new token ids (through the eos token when it stopped there) and why it ended:
    "eos" (an end-of-sequence id), "length" (max_new_tokens reached) or "cache" (the cache is full)."""
    token_ids: list[int]
    finish_reason: str
    prompt_ids: list[int]


class Carry(NamedTuple):
    cache: KVCache
    last: jax.Array      # int32 [b]: the token chosen at step - 1 (fed at this step)
    seen: jax.Array      # bool [b, vocab]: tokens in the row so far (repetition penalty)
    done: jax.Array      # bool [b]: the row emitted an eos id
    step: jax.Array      # int32: tokens chosen so far
    out: jax.Array       # int32 [b, max_len]: the chosen tokens, out[:, s] = token_s (pad after done)


def bucket(n: int) -> int:
    """The prompt bucket: the smallest power of two >= max(n, MIN_BUCKET)."""
    return max(MIN_BUCKET, 1 << max(0, (n - 1).bit_length()))


def batch_bucket(n: int) -> int:
    """Rows compiled for a batch of n prompts: the smallest power of two >= n."""
    return 1 << max(0, (n - 1).bit_length())


def cache_length(prompt_bucket: int, max_new_tokens: int) -> int:
    """prompt slots + (N - 1) decode slots, rounded up to CACHE_MULTIPLE (the last token is never fed)."""
    need = prompt_bucket + max(0, max_new_tokens - 1)
    return -(-need // CACHE_MULTIPLE) * CACHE_MULTIPLE


def _mark(seen, tokens, where):
    """seen with seen[b, tokens[b, j]] set where `where[b, j]` (tokens [b, n])."""
    rows = jnp.arange(seen.shape[0])[:, None]
    return seen.at[rows, tokens].max(where)


def _prefill(graphdef, state, ids, start, filler, seed, *, max_len: int, sampling: SamplingConfig, eos: tuple,
             pad: int) -> Carry:
    """Fills slots [0, P) from the left-padded prompts and picks token 0 (filler rows start done)."""
    model = nnx.merge(graphdef, state)
    b, t = ids.shape
    cache = KVCache.create(model.config, b, max_len, start, dtype=model.dtype, per_layer=not is_stacked(model))
    segments = cache.valid(t)[:, :t]
    h, cache = model.hidden_states(ids, cache.positions(t), segments, cache=cache)
    cache = cache.advanced(t)
    logits = model.logits_from_hidden(h[:, -1:])[:, 0]
    seen = _mark(jnp.zeros((b, logits.shape[-1]), bool), ids, segments.astype(bool))
    token = next_tokens(logits, seen, jnp.int32(0), sampling, seed=seed)
    done = filler | jnp.isin(token, jnp.asarray(eos, jnp.int32)) if eos else filler
    seen = _mark(seen, token[:, None], jnp.ones((b, 1), bool))
    out = jnp.full((b, max_len), pad, jnp.int32).at[:, 0].set(token)
    return Carry(cache, token, seen, done, jnp.int32(1), out)


def _decode(graphdef, state, carry: Carry, stop, seed, *, sampling: SamplingConfig, eos: tuple, pad: int) -> Carry:
    """Decode steps until `stop` tokens are chosen or every row is done (stop, seed: traced int32)."""
    model = nnx.merge(graphdef, state)
    b = carry.last.shape[0]
    eos_ids = jnp.asarray(eos, jnp.int32)

    def cond(c: Carry):
        return (c.step < stop) & ~jnp.all(c.done)

    def body(c: Carry) -> Carry:
        h, cache = model.hidden_states(c.last[:, None], c.cache.positions(1), jnp.ones((b, 1), jnp.int32),
                                       cache=c.cache)
        logits = model.logits_from_hidden(h)[:, 0]
        token = next_tokens(logits, c.seen, c.step, sampling, seed=seed)
        token = jnp.where(c.done, pad, token)
        seen = _mark(c.seen, token[:, None], ~c.done[:, None])
        done = c.done | jnp.isin(token, eos_ids) if eos else c.done
        out = jax.lax.dynamic_update_slice(c.out, token[:, None], (0, c.step))
        return Carry(cache.advanced(1), token, seen, done, c.step + 1, out)

    return jax.lax.while_loop(cond, body, carry)


_JITTED = StructureCache()


def jitted(graphdef) -> tuple[Callable, Callable]:
    """The jitted (prefill, decode) of a model structure (kept per equal graphdef: jlora.models.structure_cache).
    The graphdef is closed over, not a static argument: a LoRA model's graphdef holds its LoraConfig, which
    compares but does not hash."""
    return _JITTED.get(graphdef, lambda: (
        jax.jit(functools.partial(_prefill, graphdef), static_argnames=("max_len", "sampling", "eos", "pad")),
        jax.jit(functools.partial(_decode, graphdef), static_argnames=("sampling", "eos", "pad"),
                donate_argnames=("carry",))))


def _replicated(state) -> NamedSharding | None:
    """Where host inputs go when the params span several processes: replicated over their mesh (None when
    every param is on this process's devices: jit places host arrays itself)."""
    for leaf in jax.tree.leaves(state):
        sharding = getattr(leaf, "sharding", None)
        if sharding is None or leaf.is_fully_addressable:
            continue
        mesh = (sharding.mesh if isinstance(sharding, NamedSharding)
                else Mesh(np.asarray(sorted(sharding.device_set, key=lambda d: d.id)), ("devices",)))
        return NamedSharding(mesh, PartitionSpec())
    return None


def _host(x) -> np.ndarray:
    """x on this host, whole: an array spread over other processes is gathered (a collective: every process
    reads the same arrays in the same order)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _check_prompts(prompts, vocab: int) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of token id lists, found {type(prompts).__name__}")
    out = []
    for i, p in enumerate(prompts):
        ids = np.asarray(p)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"prompt {i}: expected a non-empty list of token ids, found {p!r:.80}")
        if ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(f"prompt {i}: token ids must be in [0, {vocab}) (the model's vocab_size), found "
                             f"{int(ids.min())}..{int(ids.max())}")
        out.append([int(x) for x in ids])
    return out


def fit_prompts(prompts: list[list[int]], max_new_tokens: int, max_len: int | None, truncate: bool):
    """(prompts, prompt bucket P, cache length): prompts cut from the left when `truncate` and they leave too
    little room; a prompt longer than an explicit max_len is an error naming both lengths."""
    if max_len is None:
        p = bucket(max(map(len, prompts)))
        return prompts, p, cache_length(p, max_new_tokens)
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len (the cache length) must be a positive integer, found {max_len!r}")
    if truncate:
        keep = max(1, max_len - max_new_tokens + 1)
        prompts = [p[-keep:] for p in prompts]
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    if len(prompts[longest]) > max_len:
        raise ValueError(f"prompt {longest} has {len(prompts[longest])} tokens, longer than the cache "
                         f"(max_len={max_len}); raise max_len or pass truncate=True to keep its last tokens")
    return prompts, min(bucket(len(prompts[longest])), max_len), max_len


def generate_tokens(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128,
                    sampling: SamplingConfig = SamplingConfig(), eos_token_ids: Sequence[int] = (),
                    pad_token_id: int = 0, max_len: int | None = None, truncate: bool = False,
                    on_step: Callable[[np.ndarray, np.ndarray], None] | None = None) -> list[TokenOutput]:
    """New tokens for each prompt (lists of token ids) from a jlora CausalLM (LoRA, NF4: any).

    max_new_tokens: per row, at most; eos_token_ids: a row stops after emitting one (included in its
    output); max_len: the cache length (default: enough for the longest prompt plus max_new_tokens);
    truncate: cut prompts from the left to fit max_len instead of failing. on_step(tokens [b], done [b]):
    called after each token with the tokens just chosen (decoding then runs one step per call: for
    streaming).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, found {max_new_tokens!r}")
    if not isinstance(sampling, SamplingConfig):
        raise ValueError(f"sampling must be a SamplingConfig, found {type(sampling).__name__}")
    prompts = _check_prompts(prompts, model.config.vocab_size)
    prompts, p, max_len = fit_prompts(prompts, max_new_tokens, max_len, truncate)
    rows = batch_bucket(len(prompts))  # filler rows repeat prompt 0, start done, and are dropped
    padded = prompts + [prompts[0]] * (rows - len(prompts))
    ids = np.full((rows, p), pad_token_id, np.int32)
    for row, prompt in enumerate(padded):
        ids[row, p - len(prompt):] = prompt
    start = np.asarray([p - len(prompt) for prompt in padded], np.int32)
    filler = np.arange(rows) >= len(prompts)
    limit = min(max_new_tokens, max_len - p + 1)
    eos = tuple(sorted({int(e) for e in eos_token_ids}))
    graphdef, state = inference_split(model)  # DoRA: m / ||W + sBA|| once, carried as data
    prefill, decode = jitted(graphdef)
    sharding = _replicated(state)  # several processes: inputs replicated over the params' mesh
    put = jnp.asarray if sharding is None else (lambda x: jax.device_put(np.asarray(x), sharding))
    seed = put(np.int32(sampling.seed))
    statics = dict(sampling=dataclasses.replace(sampling, seed=0), eos=eos, pad=int(pad_token_id))
    carry = prefill(state, put(ids), put(start), put(filler), seed, max_len=max_len, **statics)
    while True:  # step and done read to the host once per call (a gather when the params span processes)
        step, done = int(_host(carry.step)), _host(carry.done)
        if on_step is not None:
            on_step(_host(carry.last)[:len(prompts)], done[:len(prompts)])
        if step >= limit or done.all():
            break
        stop = limit if on_step is None else step + 1  # streaming: one token per call
        carry = decode(state, carry, put(np.int32(stop)), seed, **statics)
    return _outputs(_host(carry.out), step, eos, prompts, max_new_tokens)


def _outputs(out: np.ndarray, steps: int, eos: tuple, prompts, max_new_tokens: int) -> list[TokenOutput]:
    results = []
    for row, prompt in enumerate(prompts):
        tokens = out[row, :steps].tolist()
        stop = next((i for i, t in enumerate(tokens) if t in eos), None)
        if stop is not None:
            results.append(TokenOutput(tokens[:stop + 1], "eos", prompt))
        else:
            results.append(TokenOutput(tokens, "length" if steps >= max_new_tokens else "cache", prompt))
    return results
