"""`--model` as a local directory or a Hugging Face Hub id, resolved to a local directory.

A path that exists is used as it is. Otherwise a name shaped like a Hub repo id (`org/name`,
optionally `org/name@revision`) is fetched with `huggingface_hub.snapshot_download`, restricted to
what jlora reads: config, `model*.safetensors` (+ index) and tokenizer files, never pickles, GGUF or
a repo's `consolidated.safetensors` copy. The cache is the one transformers uses (`HF_HUB_CACHE`,
else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`), read from the environment at call time, and
`HF_HUB_OFFLINE=1` only looks there. A snapshot that cannot be had (offline and not cached, no
network, no such repo, a gated repo) is a `CheckpointError` of one line saying how to pass a local
directory instead.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from jlora.convert.safetensors_io import CheckpointError

ALLOW_PATTERNS = [
    "config.json", "generation_config.json",
    "model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
]
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_])(@(?P<revision>[\w./-]+))?$")


def is_hub_id(model: str) -> bool:
    """Whether `model` reads as `org/name[@revision]` (and not as `./x`, `/x`, `~/x` or `a/b/c`)."""
    return bool(_HUB_ID.match(model)) and ".." not in model


def hub_cache_dir() -> Path:
    """transformers' and huggingface_hub's model cache, from the environment as it is now."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return Path(cache).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_model(model) -> Path:
    """The local directory for `model`: an existing path as it is, a Hub id fetched into the HF cache."""
    path = Path(model).expanduser()
    if path.exists() or not isinstance(model, str) or not is_hub_id(model):
        return path
    match = _HUB_ID.match(model)
    repo, revision = match["repo"], match["revision"]
    offline = hub_offline()
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
        return Path(snapshot_download(repo, revision=revision, cache_dir=hub_cache_dir(),
                                      allow_patterns=ALLOW_PATTERNS, local_files_only=offline,
                                      etag_timeout=10))
    except Exception as e:  # noqa: BLE001 - every failure here becomes the one line below
        reason = _reason(e, offline)
    raise CheckpointError(
        f"model {model!r}: no such local directory, and the Hugging Face Hub id could not be fetched ({reason}); "
        f"pass a local checkpoint directory (config.json, model*.safetensors, tokenizer files), e.g. "
        f"one made with `hf download {repo} --local-dir DIR` on a machine with network access")


def _reason(e: Exception, offline: bool) -> str:
    name = type(e).__name__
    if offline and name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        return f"HF_HUB_OFFLINE is set and {hub_cache_dir()} holds no snapshot of it"
    if name == "LocalEntryNotFoundError":
        return f"the Hub cannot be reached and {hub_cache_dir()} holds no snapshot of it"
    if name == "GatedRepoError":
        return "the repo is gated: accept its license on huggingface.co and log in with `hf auth login`"
    if name in ("RepositoryNotFoundError", "RevisionNotFoundError"):
        return "no such repo or revision on the Hub, or it is private: log in with `hf auth login`"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{name}: {first}" if first else name


def base_model_name(model, model_dir: Path) -> str:
    """What an adapter's `base_model_name_or_path` should say: the Hub repo id when `model` was fetched
    through the Hub (portable, as PEFT writes it), else the absolute local directory."""
    if isinstance(model, str) and is_hub_id(model) and Path(model_dir) != Path(model).expanduser():
        return _HUB_ID.match(model)["repo"]
    return str(Path(model_dir).resolve())
