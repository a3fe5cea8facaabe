"""The double-quant offset: torch's CPU float32 mean, reproduced bit for bit."""
import jax
import numpy as np
import pytest

from jlora.nf4.torch_mean import torch_cpu_mean

# Lengths crossing every branch: below one 8-lane vector, leftover lanes and scalars, one and
# several 16-row cascade blocks, and a second cascade level.
SIZES = [1, 7, 9, 33, 130, 513, 1000, 4097, 16411, 40000]


@pytest.fixture
def one_thread(bnb):
    """torch splits sums of 32768 or more elements between threads; jlora follows one thread."""
    threads = bnb.torch.get_num_threads()
    bnb.torch.set_num_threads(1)
    yield
    bnb.torch.set_num_threads(threads)


@pytest.mark.parametrize("n", SIZES)
def test_matches_torch_mean(bnb, bits, one_thread, n):
    rng = np.random.default_rng(n)
    mean = jax.jit(torch_cpu_mean)
    for scale in (1e-3, 0.7, 30.0):
        x = (rng.random(n) * scale).astype(np.float32)
        expected = bnb.torch.from_numpy(x).mean().numpy()
        assert bits(mean(x)) == bits(expected), (n, scale)


def test_differs_from_plain_float32_sum():
    """The order matters: a pairwise or sequential sum gives other last bits for some inputs."""
    x = np.random.default_rng(0).random(1000).astype(np.float32)
    sequential = np.float32(0)
    for v in x:
        sequential = np.float32(sequential + v)
    assert jax.jit(torch_cpu_mean)(x) != sequential / np.float32(1000)
