"""`jlora train --config run.yaml [overrides]`, and `--merge` writing a checkpoint transformers loads."""
import json

import numpy as np
import pytest
import torch

import jlora
from jlora.cli import main
from jlora.train import TrainConfig


def test_yaml_config_with_flag_override_and_merge(tmp_path, hf_model, rel):
    out = tmp_path / "r"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"out: {out}\nsteps: 2\nbatch_size: 2\nseq_len: 48\neval_every: 0\nr: 4\nmerge: true\n"
                   "progress: false\n")
    assert main(["train", "--config", str(cfg), "--steps", "3"]) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4

    ids = np.random.RandomState(0).randint(3, 200, (1, 12))
    adapted = jlora.load_adapter(jlora.load_hf(out / "base"), out / "adapter")(ids)
    with torch.no_grad():
        merged = hf_model(out / "merged")(torch.tensor(ids)).logits.numpy()
    assert rel(merged, adapted) <= 1e-5


def test_unknown_yaml_setting_is_named(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("stepz: 3\n")
    with pytest.raises(ValueError, match=r"unknown settings \['stepz'\]"):
        TrainConfig.from_yaml(cfg)
