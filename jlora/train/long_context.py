"""A run's long-context settings applied to its model: `--attention`, `--remat`, and `--seq-len` against the
model's `max_position_embeddings`.

    check_platform(config)                  # up front: the attention backend runs on this platform
    configure_model(model, config, log=log) # sets the backend and the remat policy; warns past the trained length
    with tracing_context(config, mesh): ... # trace the step here: splash then runs per device (shard_map)

`--remat auto` is resolved by `jlora train` (jlora.commands.train, which asks jlora plan's estimate for the
lightest policy that fits a chip). A config that reaches the trainer still saying "auto" (a library call)
gets "none" on CPU, where XLA's compiled step holds the same memory whatever the policy (XLA:CPU undoes
rematerialization; tests/long_context/test_remat.py), and "full" elsewhere, the policy that fits most
without host memory; the run's log says which.
"""
from __future__ import annotations

import jax

import contextlib

from jlora.attention import check_backend, use_attention
from jlora.remat import POLICIES
from jlora.train.config import ConfigError, TrainConfig


def check_platform(config: TrainConfig) -> None:
    """ConfigError naming the flag when `--attention` does not run on this platform."""
    try:
        check_backend(config.attention)
    except ValueError as e:
        raise ConfigError(f"--attention {config.attention}: {e}") from None


def remat_policy(remat: str, *, platform: str | None = None) -> tuple[str, str | None]:
    """(policy, note): `remat` itself, or what an unresolved "auto" means on `platform` (default: here)."""
    if remat != "auto":
        if remat not in POLICIES:
            raise ConfigError(f"--remat {remat!r}: expected one of {', '.join(POLICIES)}, auto")
        return remat, None
    platform = platform or jax.default_backend()
    if platform == "cpu":
        return "none", "--remat auto: none on CPU (XLA:CPU holds the same memory under every remat policy)"
    return "full", f"--remat auto: full on {platform} (no jlora plan estimate was made for this run)"


def rope_scaling_text(model_config) -> str:
    """The rope scaling in force, e.g. `llama3 (factor=8.0, original_max_position_embeddings=8192)`, or "none"."""
    scaling = getattr(model_config, "rope_scaling", None)
    if not scaling:
        return "none"
    d = dict(scaling)
    kind = d.pop("rope_type", None) or d.pop("type", None) or "unnamed"
    d.pop("type", None)
    return f"{kind} ({', '.join(f'{k}={v}' for k, v in sorted(d.items()))})" if d else kind


def seq_len_warning(model_config, seq_len: int) -> str | None:
    """A warning when `seq_len` exceeds the model's max_position_embeddings (allowed: rope extrapolates or a
    scaling stretches it), naming the rope scaling in force; None otherwise."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if not limit or seq_len <= limit:
        return None
    return (f"warning: --seq-len {seq_len:,} exceeds the model's max_position_embeddings {limit:,}; rope "
            f"scaling in force: {rope_scaling_text(model_config)}. Positions past {limit:,} were not seen in "
            f"pretraining; packed rows reset positions per example, so only examples longer than that reach them")


def configure_model(model, config: TrainConfig, *, log=print) -> str:
    """Sets `model`'s attention backend and remat policy from `config`; logs the --seq-len warning and what
    an unresolved --remat auto chose. Returns the remat policy."""
    check_platform(config)
    use_attention(model, config.attention)
    policy, note = remat_policy(config.remat)
    if note:
        log(note)
    model.remat = policy
    warning = seq_len_warning(model.config, config.seq_len)
    if warning:
        log(warning)
    return policy


def tracing_context(config: TrainConfig, mesh):
    """`jax.set_mesh(mesh)` when the step's attention is splash on a mesh of several devices, else nothing.

    Splash is a Mosaic call XLA cannot partition: under the mesh context it runs per device under
    shard_map (jlora.attention.splash); traced without it, XLA would replicate the call (every chip
    computing the whole batch's attention). jlora plan traces its steps the same way."""
    splash = config.attention == "splash" or (config.attention == "auto" and jax.default_backend() == "tpu")
    if mesh is None or mesh.size <= 1 or not splash:
        return contextlib.nullcontext()
    return jax.set_mesh(mesh)
