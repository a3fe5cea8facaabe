"""StructureCache keys on equality (nnx graphdefs do not hash), builds once per equal key, keeps the most
recently used `keep`."""
from flax import nnx

import jlora
from jlora.llama_config import LlamaConfig
from jlora.models.structure_cache import StructureCache


def test_equal_graphdefs_share_one_build_and_the_least_recent_goes():
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    first = nnx.split(jlora.init_random(config))[0]
    again = nnx.split(jlora.init_random(config))[0]      # another model of the same structure: equal, unhashable
    other = nnx.split(jlora.get_peft_model(jlora.init_random(config), jlora.LoraConfig(r=2),
                                           rngs=nnx.Rngs(0)))[0]
    assert first == again and first != other
    cache, builds = StructureCache(keep=1), []

    def build(tag):
        return lambda: builds.append(tag) or tag
    assert cache.get(first, build("a")) == "a" and cache.get(again, build("b")) == "a"
    assert cache.get(other, build("c")) == "c"          # keep=1: `first` is dropped
    assert cache.get(first, build("d")) == "d" and builds == ["a", "c", "d"]
