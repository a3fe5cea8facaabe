"""Tiny random transformers checkpoints for the tests: the independent reference every family test loads
through jlora's real loading code."""


def save_random_model(config, out_dir, *, seed: int = 0, norm_mean: float = 1.0, norm_std: float = 0.1,
                      bias_std: float | None = None, weight_std: float | None = None):
    """transformers' random model of `config` (float32), saved with save_pretrained as safetensors.

    Norm weights become norm_mean + N(0, norm_std^2) (non-trivial, so a missed norm shows); with bias_std,
    biases N(0, bias_std^2); with weight_std, every other parameter N(0, weight_std^2)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * norm_std + norm_mean)
            elif name.endswith(".bias") and bias_std is not None:
                p.copy_(torch.randn_like(p) * bias_std)
            elif weight_std is not None:
                p.copy_(torch.randn_like(p) * weight_std)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def built_once(tmp_path_factory, build, prefix: str):
    """get(name) -> build(name, fresh dir), each name built once (the body of the checkpoint fixtures)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build(name, tmp_path_factory.mktemp(f"{prefix}-{name}"))
        return cache[name]
    return get
