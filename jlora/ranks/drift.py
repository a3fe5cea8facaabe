"""How far an exported adapter's logits are from the original's, on random token sequences.

    drift    = max |logits(base + exported) - logits(base + original)|
    relative = drift / max |logits(base + original)|
    of_update = drift / max |logits(base + original) - logits(base)|   (share of the adapter's own effect)

The base is loaded once; adapters are swapped on it (jlora.load_adapter), float32 throughout.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _drop_adapters(model) -> None:
    from jlora.peft_model import adapted_modules
    for _, m in list(adapted_modules(model)):
        m.lora = None


def logit_drift(base_dir, original_dir, exported_dir, *, samples: int = 4, length: int = 32, seed: int = 0,
                model=None) -> tuple[dict, object]:
    """(drift report, the base model carrying the exported adapter) for reuse by --merge."""
    import jlora

    model = model if model is not None else jlora.load_hf(Path(base_dir), dtype="float32")
    vocab = model.config.vocab_size
    ids = np.random.RandomState(seed).randint(0, vocab, (samples, length))
    base = np.asarray(model(ids), np.float64)
    jlora.load_adapter(model, Path(original_dir))
    original = np.asarray(model(ids), np.float64)
    _drop_adapters(model)
    jlora.load_adapter(model, Path(exported_dir))
    exported = np.asarray(model(ids), np.float64)
    drift = float(np.abs(exported - original).max())
    update = float(np.abs(original - base).max())
    report = {"samples": samples, "length": length, "max_abs": drift,
              "relative": drift / max(float(np.abs(original).max()), 1e-30),
              "of_update": drift / update if update > 0 else 0.0}
    return report, model
