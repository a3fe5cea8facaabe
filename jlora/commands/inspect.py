"""`jlora inspect ADAPTER_DIR`: per adapted module, |delta W|, its singular values and effective rank.

Reads the adapter and writes nothing into it: the heat map goes to --out (default: the run dir given a
`jlora train` run dir, else the current directory). Tensors it does not analyse (DoRA magnitudes,
modules_to_save weights, ...) are named, one line per kind.
"""
from __future__ import annotations

import json
import sys


def register(sub):
    from jlora.commands.help_format import examples
    p = sub.add_parser("inspect", help="norms, singular values and effective rank of each module's delta W "
                                       "(jlora, PEFT or Unsloth adapters)",
                       epilog=examples("jlora inspect runs/x                 # heat map to runs/x/effective_rank.png",
                                       "jlora inspect path/to/peft_adapter --json --plot rank.png"))
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="adapter dir, or a `jlora train` run dir")
    p.add_argument("--json", action="store_true",
                   help="print only a JSON list: module, layer, kind, r, scale, norm, singular_values, "
                        "effective_rank_90, effective_rank_99")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where effective_rank.png goes (default: the run dir when given a `jlora train` run dir, "
                        "else the current directory; never into the adapter dir, which may not be yours); "
                        "with --json, a plot is written only when --out or --plot is given")
    p.add_argument("--plot", default=None, metavar="FILE", help="the heat map PNG's exact path (overrides --out)")
    p.add_argument("--allow-pickle", action="store_true", help="read adapter_model.bin (pickle)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from pathlib import Path

    import numpy as np

    from jlora.convert.safetensors_io import CheckpointError
    from jlora.ranks.adapter import read_adapter
    from jlora.ranks.plots import rank_heatmap
    from jlora.ranks.unanalysed import not_analysed
    from jlora.ranks.usage import rank_usage, usage_summary

    try:
        adapter = read_adapter(args.adapter, allow_pickle=args.allow_pickle)
    except (CheckpointError, ValueError) as e:
        print(f"jlora inspect: error: {e}", file=sys.stderr)
        return 2
    bad = [f"{m.name}.{w} ({'NaN' if np.isnan(t).any() else 'inf'})" for m in adapter.modules
           for w, t in (("lora_A", m.a), ("lora_B", m.b)) if not np.isfinite(t).all()]
    if bad:  # the SVD below would fail with numpy's bare "SVD did not converge"
        print(f"jlora inspect: error: {adapter.path}: expected finite adapter weights, found NaN/inf in "
              f"{len(bad)} tensor(s): {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} "
              "(the run that wrote it diverged)", file=sys.stderr)
        return 2
    rows = rank_usage(adapter)
    plot = _plot_path(args, adapter.path)
    if plot is not None and any(r["layer"] is not None for r in rows):
        rank_heatmap(rows, plot, title=f"{Path(args.adapter).name}: effective rank")
    else:
        plot = None
    skipped = not_analysed(adapter.other, adapter.config)
    if args.json:
        print(json.dumps(rows, indent=1))
        for line in skipped:  # stdout stays one JSON document
            print(line, file=sys.stderr)
        return 0
    width = max(len(r["module"]) for r in rows)
    print(f"{adapter.path}: {len(rows)} adapted modules")
    print(f"{'module':<{width}}  {'r':>4}  {'scale':>7}  {'|delta W|':>10}  {'rank90':>6}  {'rank99':>6}  "
          f"top singular values")
    for r in rows:
        top = ", ".join(f"{x:.3g}" for x in r["singular_values"][:4])
        print(f"{r['module']:<{width}}  {r['r']:>4}  {r['scale']:>7.4g}  {r['norm']:>10.4g}  "
              f"{r['effective_rank_90']:>6}  {r['effective_rank_99']:>6}  {top}")
    print()
    for line in usage_summary(rows):
        print(line)
    for line in skipped:
        print(line)
    if plot is not None:
        print(f"heat map: {plot}")
    return 0


def _plot_path(args, adapter_dir):
    """--plot, else --out/effective_rank.png; by default the run dir (given one) or the current directory."""
    from pathlib import Path

    if args.plot:
        return Path(args.plot)
    if args.out:
        return Path(args.out) / "effective_rank.png"
    if args.json:
        return None
    given = Path(args.adapter)
    return (given if adapter_dir.resolve() != given.resolve() else Path.cwd()) / "effective_rank.png"
