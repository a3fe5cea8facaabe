"""Several adapters in one batch equal each adapter alone (logits rel <= 1e-5 per row), ranks padded exactly."""
import numpy as np
import pytest
from flax import nnx

import jlora
from jlora.generate import multi_lora
from jlora.generate.decode import generate_tokens

ADAPTERS = {"qv2": dict(r=2, lora_alpha=4, target_modules="qv"),
            "all6": dict(r=6, lora_alpha=8, use_rslora=True, rank_pattern={"down_proj": 3})}
ROWS = ["all6", None, "qv2", "all6"]


@pytest.fixture(scope="module")
def adapters(checkpoint, tmp_path_factory):
    path = checkpoint("llama")
    dirs = {}
    for seed, (name, kw) in enumerate(ADAPTERS.items()):
        model = jlora.get_peft_model(jlora.load_hf(path), jlora.LoraConfig(init_lora_weights=False, **kw),
                                     rngs=nnx.Rngs(seed))
        dirs[name] = tmp_path_factory.mktemp(name)
        jlora.save_pretrained(model, dirs[name])
    return path, dirs


def _rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def test_batch_of_adapters_equals_each_alone(adapters):
    path, dirs = adapters
    base = jlora.load_hf(path)
    model, names = multi_lora.build(base, dirs)
    assert next(iter(jlora.peft_model.adapted_modules(base)), None) is None, "the base must stay unadapted"
    multi_lora.set_rows(model, multi_lora.row_indices(names, ROWS, len(ROWS)))
    ids = np.random.RandomState(0).randint(0, 96, (len(ROWS), 12))
    got = np.asarray(model(ids))
    alone = {None: np.asarray(base(ids))}
    for name, d in dirs.items():
        alone[name] = np.asarray(jlora.load_adapter(jlora.load_hf(path), d)(ids))
    assert _rel(alone["qv2"], alone[None]) > 1e-3 and _rel(alone["all6"], alone["qv2"]) > 1e-3
    for row, name in enumerate(ROWS):
        assert _rel(got[row], alone[name][row]) <= 1e-5, (row, name)


def test_unknown_adapter_id_is_named(adapters):
    path, dirs = adapters
    with pytest.raises(ValueError, match=r"adapter_ids\[1\] = 'nope' names no adapter; adapters: qv2, all6"):
        jlora.generate(jlora.load_hf(path), None, ["x", "y"], adapters=dirs, adapter_ids=["qv2", "nope"])
    with pytest.raises(ValueError, match="one per prompt"):
        multi_lora.row_indices(["a"], ["a"], 2)


@pytest.mark.slow
def test_generated_tokens_equal_each_adapter_alone(adapters):
    path, dirs = adapters
    prompts = [np.random.RandomState(i).randint(3, 96, n).tolist() for i, n in enumerate((5, 9, 3, 7))]
    model, names = multi_lora.build(jlora.load_hf(path), dirs)
    multi_lora.set_rows(model, multi_lora.row_indices(names, ROWS, len(ROWS)))
    got = [o.token_ids for o in generate_tokens(model, prompts, max_new_tokens=12)]
    for row, name in enumerate(ROWS):
        single = jlora.load_hf(path) if name is None else jlora.load_adapter(jlora.load_hf(path), dirs[name])
        assert got[row] == generate_tokens(single, [prompts[row]], max_new_tokens=12)[0].token_ids, (row, name)


def test_adapter_training_embedding_rows_is_refused_by_name(adapters, tmp_path):
    """Its trained embedding rows would be dropped silently: only LoRA A/B are gathered per row."""
    path, dirs = adapters
    model = jlora.get_peft_model(jlora.load_hf(path), jlora.LoraConfig(r=2, target_modules="qv",
                                                                       trainable_token_indices=[5, 7]),
                                 rngs=nnx.Rngs(0))
    jlora.save_pretrained(model, tmp_path / "tokens")
    with pytest.raises(ValueError, match=r"adapters \['tokens'\] also train the embedding or the head"):
        multi_lora.build(jlora.load_hf(path), {**dirs, "tokens": tmp_path / "tokens"})
