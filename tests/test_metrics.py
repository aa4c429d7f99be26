"""State matching against brute force over all relabellings."""

import itertools

import numpy as np

from ppl_switch.analysis.metrics import match_states, matched_state_accuracy
import pytest

# oracle comparisons at 1e-8 and below need float64 (tests/conftest.py: float32 is the default)
pytestmark = pytest.mark.float64


def test_match_states_is_the_best_permutation():
    rng = np.random.default_rng(0)
    for _ in range(20):
        truth = rng.integers(0, 4, 60)
        inferred = np.where(rng.random(60) < 0.7, rng.permutation(4)[truth], rng.integers(0, 4, 60))
        best = max(np.mean(np.asarray(p)[truth] == inferred) for p in itertools.permutations(range(4)))
        perm = match_states(truth, inferred, 4)
        assert sorted(perm) == [0, 1, 2, 3]
        assert np.isclose(np.mean(perm[truth] == inferred), best)
        assert np.isclose(matched_state_accuracy(truth, inferred, 4), best)
