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
from pathlib import Path, PurePath

from jlora.convert.safetensors_io import CheckpointError
from jlora.convert.tokenizer_files import MODEL_SIDE_FILES

ALLOW_PATTERNS = ["config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
                  *MODEL_SIDE_FILES]
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


def resolve_model(model, *, cache_first: bool = False, cache_only: bool = False) -> Path:
    """The local directory for `model`: an existing path as it is, a Hub id fetched into the HF cache.

    `model` is a str or a path; a path that does not exist but reads as `org/name[@revision]` is a Hub id
    too. `cache_first`: a cached snapshot is used without asking the Hub whether it is still the newest
    (for a base an adapter names: the snapshot it was trained on), the Hub only when none is cached;
    `cache_only`: never the Hub (as with HF_HUB_OFFLINE=1).
    """
    path = Path(model).expanduser()
    name = str(model) if isinstance(model, (str, PurePath)) else None
    if path.exists() or name is None or not is_hub_id(name):
        return path
    match = _HUB_ID.match(name)
    repo, revision = match["repo"], match["revision"]
    offline = hub_offline() or cache_only
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars
    disable_progress_bars()
    for local_only in ((True, False) if cache_first and not offline else (offline,)):
        try:
            return Path(snapshot_download(repo, revision=revision, cache_dir=hub_cache_dir(),
                                          allow_patterns=ALLOW_PATTERNS, local_files_only=local_only,
                                          etag_timeout=10))
        except Exception as e:  # noqa: BLE001 - every failure here becomes the one line below
            reason = _reason(e, offline, cache_only)  # the last attempt's: a cache miss before the Hub is no news
    raise CheckpointError(
        f"model {name!r}: no such local directory, and the Hugging Face Hub id could not be fetched ({reason}); "
        f"pass a local checkpoint directory (config.json, model*.safetensors, tokenizer files), e.g. "
        f"one made with `hf download {repo} --local-dir DIR` on a machine with network access")


def _reason(e: Exception, offline: bool, cache_only: bool = False) -> str:
    name = type(e).__name__
    if cache_only and name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        return f"{hub_cache_dir()} holds no snapshot of it"
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


def _fetched(model, model_dir: Path) -> bool:
    return isinstance(model, str) and is_hub_id(model) and Path(model_dir) != Path(model).expanduser()


def base_model_name(model, model_dir: Path) -> str:
    """What an adapter's `base_model_name_or_path` should say: the Hub repo id when `model` was fetched
    through the Hub (portable, as PEFT writes it), else the absolute local directory."""
    if _fetched(model, model_dir):
        return _HUB_ID.match(model)["repo"]
    return str(Path(model_dir).resolve())


def base_model_revision(model, model_dir: Path) -> str | None:
    """The adapter config's `revision` (PEFT's field): the `@revision` of a Hub id `model` was fetched at."""
    return _HUB_ID.match(model)["revision"] if _fetched(model, model_dir) else None


def hub_reference(name: str | None, revision: str | None = None) -> str | None:
    """`org/name@revision` for an adapter's (base_model_name_or_path, revision), when the name is a Hub id."""
    if not name or not is_hub_id(name):
        return None
    return f"{name}@{revision}" if revision and "@" not in name else name
