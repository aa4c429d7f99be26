"""The SLDS fast path (structured mean-field EM) in the user's precision, float32, on near-noiseless data.

Not in tests/test_slds.py because that module runs in float64 (its oracles compare at 1e-8)."""

from __future__ import annotations

import numpy as np

from ppl_switch.analysis.metrics import matched_state_accuracy
from ppl_switch.data import as_sequence_data
from ppl_switch.datasets.slds_tutorial import rotation
from ppl_switch.infer.slds_em import slds_em
from ppl_switch.models.slds import SLDS
from ppl_switch.ops import switching as sw


def _near_noiseless(T=300, q=1e-3, r=0.01, seed=0):
    """Two slow rotations at radius 10 switching every 50 steps; dynamics sd q, observation sd r (N = 10).
    The M-step's second-moment sums are ~T |x|^2 = 3e4 while the residual scatter is ~T q^2 = 3e-4."""
    rng = np.random.default_rng(seed)
    K, D, N = 2, 2, 10
    A = np.stack([rotation(0.1), rotation(-0.2)])
    C, d = rng.standard_normal((N, D)), rng.standard_normal(N)
    z = np.arange(T) // 50 % 2
    x = np.zeros((T, D))
    x[0] = [10.0, 0.0]
    for t in range(1, T):
        x[t] = A[z[t]] @ x[t - 1] + q * rng.standard_normal(D)
    y = x @ C.T + d + r * rng.standard_normal((T, N))
    em = dict(initial_probs=np.full(K, 0.5), transition_matrix=np.array([[0.98, 0.02], [0.02, 0.98]]),
              initial_mean=x[0], initial_cov=0.01 * np.eye(D), dynamics_matrices=A, dynamics_biases=np.zeros((K, D)),
              input_matrices=np.zeros((K, D, 0)), dynamics_covs=np.stack([q**2 * np.eye(D)] * K),
              emission_matrix=C, emission_bias=d, emission_cov=r**2 * np.eye(N))
    return y, z, em


def test_near_noiseless_slds_em_stays_finite_and_monotone_in_float32():
    """All groups learned for 20 iterations from the true parameters. The moment form of the covariance
    M-step (Syy - W Syf' - Syf W' + W Sff W') turned Q_k indefinite here and the E-step of iteration 12
    NaN (FitError); the residual form keeps Q_k and R positive definite, the objective non-decreasing up
    to float32 rounding and the states recovered."""
    y, z, em = _near_noiseless()
    model = SLDS(num_states=2, latent_dim=2, obs_dim=10)
    out, hist = slds_em(model, as_sequence_data(y), params=model.params_from_em(em), learn=sw.EM_GROUPS, num_iters=20)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in out.values())
    p = model.params_to_em(out, np.float64)
    assert np.linalg.eigvalsh(np.asarray(p["dynamics_covs"])).min() > 0
    assert np.linalg.eigvalsh(np.asarray(p["emission_cov"])).min() > 0
    trace = np.asarray(hist["log_likelihoods"], np.float64)
    assert np.all(np.isfinite(trace))
    assert np.diff(trace).min() > -1e-5 * abs(trace[-1])  # the moment form dropped by 144 nats at T = 500
    assert matched_state_accuracy(z, out["q_state_probs"][0].argmax(-1)) >= 0.99
    # the observation noise is learned to its true size (the moment form cancels it away)
    np.testing.assert_allclose(np.sqrt(np.diag(np.asarray(p["emission_cov"]))), 0.01, rtol=0.3)
