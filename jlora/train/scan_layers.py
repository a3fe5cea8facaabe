"""Whether a training run scans its decoder layers (`--scan-layers` / `--no-scan-layers`, unset: auto).

A scanned model (jlora/models/stacked.py) compiles one layer body for any depth (flat compile time and
program size), and trains to the loop model's numbers (float32 rel <= 1e-5: tests/train/test_scan_train.py).
So a run scans by default, unless it uses something the scanned model refuses or that is not proven on it:

    lora_dropout > 0                  refused by the scan (per-layer RNG counters would not advance in it)
    LOOP_ONLY settings                none today: DoRA, modules_to_save and trainable tokens give the loop's
                                      gradients on a scanned model (tests/train/test_scan_train.py), samples
                                      during a run generate through the scan (jlora.generate)
    per-layer ranks that do not repeat  no period to scan (stacked.structural_period): compiled as the loop

    on CPU                            the scanned step runs slower there (below); auto loops, with a note

    auto  (scan_layers unset)  scan unless one of the above; a one-line note names what made it loop
    True  (--scan-layers)      scan; one of the above is an error naming both settings
    False (--no-scan-layers)   the loop

Why not on CPU: XLA:CPU widens a bfloat16 dynamic-update-slice to float32, so the scan's backward
residuals (stacked [layers, ...] bf16 arrays, one row written per layer) are converted and copied whole
at every layer; with float32 the scan still reads each layer's weights through a dynamic slice. Steady
state, SmolLM2-135M shape (`python benchmarks/jlora_step.py --config 135m --dtype D [--scan]`): bf16 2.9-6.9 s
per step scanned (median 4.86) vs 1.69 s loop, float32 3.42 vs 3.11 s; the loop compiles in ~2x the time
(20 vs 10 s), which a run recovers in its first dozen steps (benchmarks/RESULTS.md). Accelerators keep the scan (flat compile time for deep models, no such copy).

Checkpoints keep the layout's parameter names (`model.layers.group.0...` stacked, `model.layers.3...` per
layer); a run resumed with the other setting maps them exactly (jlora/train/layer_layout.py).
"""
from __future__ import annotations

from jlora.train.config import ConfigError, flag

# (TrainConfig field, its value when unused): settings not yet proven on a scanned model (a new feature goes
# here until a test shows the scan gives the loop's numbers with it). Read with getattr: it may name a field
# before it exists.
LOOP_ONLY: tuple[tuple[str, object], ...] = ()


def loop_reasons(config) -> list[str]:
    """`--lora-dropout 0.1` for each setting of `config` that needs the loop model."""
    reasons = [f"--lora-dropout {config.lora_dropout:g}"] if config.lora_dropout > 0 else []
    for name, unused in LOOP_ONLY:
        value = getattr(config, name, unused)
        if value not in (unused, None, False, 0, [], ()):
            reasons.append(f"{flag(name)} {value}")
    return reasons


def decide(config, platform: str | None = None) -> tuple[bool, str | None]:
    """(scan, note): whether the run scans its layers, and the one line to print when auto chose the loop.
    `--scan-layers` with a setting that needs the loop is a ConfigError naming both. `platform`: jax's
    default backend ("cpu", "gpu", "tpu"; None: this process's)."""
    reasons = loop_reasons(config)
    if config.scan_layers is False:
        return False, None
    if config.scan_layers is True:
        if reasons:
            raise ConfigError(f"--scan-layers cannot be combined with {', '.join(reasons)} (the scanned model "
                              f"{'refuses LoRA dropout' if config.lora_dropout > 0 else 'is not yet checked with it'}"
                              f"); pass --no-scan-layers or drop {reasons[0].split()[0]}")
        return True, None
    if reasons:
        return False, (f"layers: the loop model (scanned layers need the loop with {', '.join(reasons)}; "
                       f"--no-scan-layers silences this)")
    if platform is None:
        from jlora.attention.backends import platform as default_platform  # pylint: disable=import-outside-toplevel
        platform = default_platform()
    if platform == "cpu":
        return False, ("layers: the loop model (on CPU a scanned step runs 10-70% slower: jlora/train/"
                       "scan_layers.py; --scan-layers to scan anyway, --no-scan-layers silences this)")
    return True, None


def settle(model, log=print):
    """After the adapters are attached: a scanned model whose layers do not repeat (per-layer ranks that
    differ layer by layer: one scanned group) goes back to the loop, with a note. Returns the model."""
    from jlora.models.stacked import is_stacked, unstack_layers
    if is_stacked(model) and model.model.layers.groups == 1 and len(model.model.layers) > 1:
        log(f"layers: the loop model (the {len(model.model.layers)} layers' adapters do not repeat in a "
            f"period, e.g. per-layer ranks: nothing to scan)")
        return unstack_layers(model)
    if is_stacked(model):
        stack = model.model.layers
        log(f"layers: scanned ({len(stack)} layers: {stack.groups} scanned groups of {stack.period}"
            + (f" + {len(stack.tail)} looped" if len(stack.tail) else "") + "; --no-scan-layers for the loop)")
    return model
