"""State matching against brute force over all relabellings."""

import itertools

import numpy as np

from ppl_switch.analysis.gpslds_analysis import dynamics_nmse, visited_cells
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


def test_visited_cells_put_each_count_at_its_own_x1_x2_cell():
    """30 points in the cell x1 in [-6, -5), x2 in [4, 5) of a 20 x 20 grid on [-10, 10]^2, 5 in another:
    exactly that cell is visited (min_count 20), with centre (-5.5, 4.5), not its transpose (4.5, -5.5)."""
    rng = np.random.default_rng(0)
    busy = np.stack([rng.uniform(-6, -5, 30), rng.uniform(4, 5, 30)], -1)
    sparse = np.stack([rng.uniform(1, 2, 5), rng.uniform(1, 2, 5)], -1)
    centres, visited = visited_cells(np.concatenate([busy, sparse])[None], -10, 10, num=20, min_count=20)
    assert centres.shape == (400, 2) and visited.sum() == 1
    np.testing.assert_allclose(centres[visited][0], [-5.5, 4.5])


def test_dynamics_nmse_is_normalised_by_the_true_drift():
    f_true = np.array([[3.0, 0.0], [0.0, 4.0]])  # sum of squares 25
    f_est = np.array([[3.0, 1.0], [0.0, 2.0]])  # squared error 1 + 4 = 5 (the estimate's own sum of squares: 14)
    assert dynamics_nmse(f_est, f_true) == pytest.approx(5 / 25)
