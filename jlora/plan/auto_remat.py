"""`jlora train --remat auto` on a TPU or GPU: the first policy of none, full, offload (jlora.remat.AUTO_ORDER)
whose estimated device bytes (jlora.plan.estimate, the same as `jlora plan` on GPUs) fit the device.

    policy, estimates = lightest_fitting_remat(config, model_config, device_bytes=16 << 30, mesh_sizes=sizes)

`config` is the run's TrainConfig (rows, seq_len, LoRA, dtype, quantize, attention, loss chunk). An estimate
can be off by -20% to +5% (jlora.plan.estimate), so a policy fits under MARGIN of the device's memory.
When none fits, the last ("offload") is chosen and the caller says the run may not fit.
"""
from __future__ import annotations

from jlora.attention import use_attention
from jlora.plan.arguments import ArraySizes
from jlora.plan.estimate import ActivationModel, estimate_bytes_per_device
from jlora.plan.model import abstract_lora_model, lora_config
from jlora.remat import AUTO_ORDER

MARGIN = 0.9


def traced_backend(attention: str, platform: str) -> str:
    """The backend the estimate traces for `attention` on `platform` (cuDNN cannot be traced here)."""
    if attention == "auto":
        attention = {"tpu": "splash", "gpu": "cudnn"}.get(platform, "blockwise")
    return "blockwise" if attention == "cudnn" else attention


def lightest_fitting_remat(config, model_config, *, device_bytes: int, mesh_sizes: dict, platform: str = "tpu",
                           quantize: str | None = None) -> tuple[str, dict]:
    """(policy, {policy: estimated device bytes}) for the run `config` (see the module docstring)."""
    lora = lora_config(config.r, config.lora_alpha, config.targets)
    backend = traced_backend(config.attention, platform)

    def build(c):
        return use_attention(abstract_lora_model(c, lora=lora, dtype=config.dtype, quantize=quantize or config.quantize),
                             backend)

    acts = ActivationModel.measure(build, model_config, seq_len=config.seq_len, policies=AUTO_ORDER,
                                   attention=backend, chunk_tokens=config.loss_chunk_tokens or None)
    args = ArraySizes.of(build(model_config)).per_device(mesh_sizes)
    rows = config.batch_size / (mesh_sizes["data"] * mesh_sizes["fsdp"])
    estimates = {}
    for policy in AUTO_ORDER:
        estimates[policy] = estimate_bytes_per_device(sum(args.values()), args["params"], acts, rows_per_device=rows,
                                                      remat=policy, tensor=mesh_sizes["tensor"],
                                                      fsdp=mesh_sizes["fsdp"])
        if estimates[policy] <= MARGIN * device_bytes:
            return policy, estimates
    return AUTO_ORDER[-1], estimates
