"""`jlora train --use-dora`: the run trains A, B and the magnitudes, saves a DoRA adapter PEFT loads with
jlora's logits, and `--merge` writes PEFT's DoRA merge."""
import copy
import json

import numpy as np
import peft
import pytest
import torch
from safetensors.numpy import load_file

import jlora
from jlora.cli import main
from jlora.peft_model import adapted_modules


@pytest.mark.slow  # a 3-step run of the embedded default: ~35 s of CPU
def test_train_use_dora_saves_an_adapter_peft_loads(tmp_path, hf_model, close32):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--r", "4",
                 "--eval-every", "0", "--lr", "0.01", "--use-dora", "--merge", "--no-progress"]) == 0
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    assert json.loads((out / "run_config.json").read_text())["use_dora"] is True
    model = jlora.load_adapter(jlora.load_hf(out / "base"), out / "adapter")
    for name, m in adapted_modules(model):  # trained: m moved off ||W + sBA|| of the trained A, B
        kernel = np.asarray(m.kernel[...], np.float64)
        norm = np.linalg.norm(kernel + np.asarray(m.lora.delta_kernel(), np.float64), axis=0)
        assert np.abs(np.asarray(m.lora.magnitude[...]) / norm - 1).max() > 1e-4, name

    ids = np.random.RandomState(0).randint(3, 200, (1, 12))
    ref = peft.PeftModel.from_pretrained(hf_model(out / "base"), out / "adapter").eval()
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
        want64 = copy.deepcopy(ref).double()(torch.tensor(ids)).logits.numpy()
    close32(np.asarray(model(ids)), want, want64, what="trained DoRA adapter in PEFT")
    merged = load_file(str(out / "merged" / "model.safetensors"))
    peft_merged = copy.deepcopy(ref).double().merge_and_unload().state_dict()
    k = "model.layers.0.self_attn.q_proj.weight"
    close32(merged[k], ref.merge_and_unload().state_dict()[k].numpy(), peft_merged[k].numpy(), what=k)
