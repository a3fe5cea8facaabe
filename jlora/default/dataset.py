"""Where the bundled demo dataset lives."""

import importlib.resources
import pathlib


def dataset_paths() -> tuple[pathlib.Path, pathlib.Path]:
    """Returns ``(train_path, eval_path)`` of the bundled prompt/completion JSONL files.

    The files ship as package data of ``jlora.default`` (regenerate them with
    ``python -m jlora.default.make_dataset``).
    """
    root = importlib.resources.files(__package__)
    return pathlib.Path(str(root / "train.jsonl")), pathlib.Path(str(root / "eval.jsonl"))
