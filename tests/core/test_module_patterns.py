"""PEFT's module-name rules (PEFT's own functions are the reference), with bounded work on hostile patterns."""
import json
import time

import peft
import pytest
from flax import nnx
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

import jlora
from jlora.convert.safetensors_io import CheckpointError
from jlora.module_patterns import PatternError, pattern_key, target_matches

NAMES = [f"model.layers.{i}.{block}.{leaf}" for i in (0, 1, 11) for block, leafs in
         (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))
         for leaf in leafs] + ["model.embed_tokens", "lm_head", "model.layers.1.mlp.proj", "q_proj"]

TARGETS = [
    ["q_proj", "v_proj"], ["proj"], ["mlp.down_proj"], ["layers.1.mlp.up_proj"], ["embed_tokens", "lm_head"],
    ["model.layers.0.self_attn.q_proj"], ["_proj"], [],
    r".*\.(q|v)_proj", r"model\.layers\.1\.mlp\.(up|down)_proj", "q_proj", r".*proj", r"model\.layers\.\d\..*",
    r"(?i).*Q_PROJ", r".*layers\.(0|11)\.self_attn\.[qk]_proj",
]

PATTERN_KEYS = [
    ("down_proj", "layers.1.self_attn.q_proj"), ("proj",), ("_proj",), (r"layers\.1\..*",), ("layers.1",),
    (r".*\.q_proj", "q_proj"), ("q_proj|k_proj", "v_proj"), ("model.layers.11.mlp.up_proj",), ("mlp",),
    (r"\d+\.mlp\.down_proj", "down_proj"), ("lm_head", "embed_tokens"), (r"(?:self_attn|mlp)\.\w_proj",),
]


@pytest.mark.parametrize("targets", TARGETS, ids=str)
def test_target_modules_as_peft(targets):
    config = peft.LoraConfig(target_modules=targets)
    for name in NAMES:
        assert target_matches(targets, name) == bool(check_target_module_exists(config, name)), name


@pytest.mark.parametrize("keys", PATTERN_KEYS, ids=str)
def test_pattern_keys_as_peft(keys):
    pattern = {k: i + 2 for i, k in enumerate(keys)}
    for name in NAMES:
        want = get_pattern_key(keys, name)  # PEFT returns the name itself when no key applies
        assert pattern_key(pattern, name, "rank_pattern") == (want if want in pattern else None), name
        assert jlora.LoraConfig(r=16, rank_pattern=pattern).rank_for(name) == pattern.get(want, 16), name


@pytest.mark.parametrize("field", ["target_modules", "rank_pattern", "alpha_pattern"])
def test_catastrophic_pattern_is_an_error_within_a_second(field):
    """`(.|.)*[XY]` backtracks 2**31 ways on a 31-character name: unbounded, Python's `re` spends minutes."""
    bad = "(.|.)*[XY]"
    kw = {"target_modules": bad} if field == "target_modules" else {field: {"q_proj": 4, bad: 2}}
    config = jlora.LoraConfig(**kw)
    start, cpu = time.perf_counter(), time.thread_time()
    with pytest.raises(PatternError, match="backtracking") as e:
        config.check_patterns(NAMES)
    assert time.thread_time() - cpu < 1.0 and time.perf_counter() - start < 10.0  # wall: a loaded 2-core box
    assert str(e.value).startswith(field) and repr(bad) in str(e.value)


def test_nested_star_pattern_answers_fast():
    """The issue's `(.*.*)*X` (minutes under `re`): the `regex` engine answers "no match" at once, as PEFT would."""
    cpu = time.thread_time()
    config = jlora.LoraConfig(r=8, target_modules=["q_proj"], rank_pattern={"(.*.*)*X": 2})
    assert [config.rank_for(n) for n in NAMES] == [8] * len(NAMES)
    assert not any(target_matches("(.*.*)*X", n) for n in NAMES)
    assert time.thread_time() - cpu < 1.0


@pytest.mark.parametrize("kw,field", [(dict(target_modules="q_proj("), "target_modules"),
                                      (dict(rank_pattern={"[q": 2}), "rank_pattern"),
                                      (dict(alpha_pattern={"*v_proj": 2}), "alpha_pattern")])
def test_invalid_pattern_is_named(kw, field):
    bad = kw[field] if field == "target_modules" else next(iter(kw[field]))
    with pytest.raises(PatternError, match="not a valid regular expression") as e:
        jlora.LoraConfig(**kw)
    assert field in str(e.value) and repr(bad) in str(e.value)


def test_target_modules_of_wrong_type_is_named():
    with pytest.raises(PatternError, match="target_modules entry 3"):
        jlora.LoraConfig(target_modules=["q_proj", 3])


def _bad_adapter(checkpoint, tmp_path, rank_pattern):
    model = jlora.get_peft_model(jlora.load_hf(checkpoint("llama")), jlora.LoraConfig(r=4, target_modules=["q_proj"]),
                                 rngs=nnx.Rngs(0))
    jlora.save_pretrained(model, tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rank_pattern"] = rank_pattern
    cfg_path.write_text(json.dumps(cfg))
    return tmp_path / "a"


@pytest.mark.parametrize("rank_pattern,says", [({"(.|.)*[XY]": 2}, "backtracking"),
                                               ({"q_proj)": 2}, "not a valid regular expression")])
def test_adapter_files_with_bad_patterns(checkpoint, tmp_path, capsys, rank_pattern, says):
    adapter = _bad_adapter(checkpoint, tmp_path, rank_pattern)
    key = next(iter(rank_pattern))
    model = jlora.load_hf(checkpoint("llama"))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="adapter_config.json: rank_pattern key") as e:
        jlora.load_adapter(model, adapter)
    assert time.perf_counter() - start < 5.0
    assert repr(key) in str(e.value) and says in str(e.value)
    assert not any(m.lora is not None for _, m in jlora.peft_model.linear_modules(model))  # model untouched

    from jlora.cli import main
    capsys.readouterr()
    start = time.perf_counter()
    assert main(["inspect", str(adapter), "--out", str(tmp_path / "plots")]) == 2
    err = capsys.readouterr().err.strip()
    assert time.perf_counter() - start < 5.0
    assert len(err.splitlines()) == 1, err
    assert "adapter_config.json" in err and repr(key) in err and says in err

    start = time.perf_counter()
    assert main(["export", str(adapter), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert time.perf_counter() - start < 5.0
    assert "adapter_config.json" in err and repr(key) in err and not (tmp_path / "e").exists()
