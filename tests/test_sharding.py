"""``devices=``: trials split over several devices (ppl_switch/infer/sharding.py).

The device count is fixed when JAX starts, so the 1- vs 4-device comparisons run in a fresh interpreter
with ``--xla_force_host_platform_device_count=4``; the argument checks run here (no compilation).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from ppl_switch.data import SequenceData
from ppl_switch.infer import fit_em, fit_nuts
from ppl_switch.infer.sharding import mask_padded_trials, pad_trials, resolve_mesh
from ppl_switch.models import CLDS, HMM

# One interpreter for EM and SVI: the per-draw functions assemble_fit compiles for the EM fit are reused
# by the SVI fit (same model and data shapes), which keeps the whole check near 30 s of CPU.
FOUR_DEVICES_SCRIPT = r"""
import numpy as np
import jax
from jax.sharding import PartitionSpec
import ppl_switch.infer.em_loop as em_loop
import ppl_switch.infer.svi as svi_mod
from ppl_switch.infer import fit_em, fit_svi
from ppl_switch.infer.lds_em import lds_em
from ppl_switch.models import HMM, LDS

assert len(jax.devices()) == 4, jax.devices()

placed = []  # what the runners really handed to their compiled programs
def spy(module):
    inner = module.shard_trials
    def wrapper(*args, **kwargs):
        out = inner(*args, **kwargs)
        placed.append(out)
        return out
    module.shard_trials = wrapper
for module in (em_loop, svi_mod):  # the EM programs (HMM, ARHMM, LDS) are called through em_loop
    spy(module)

def check_placed(num_trials_padded):
    data = placed.pop()
    for name in ("y", "mask", "lengths"):
        x = getattr(data, name)
        assert x.shape[0] == num_trials_padded, (name, x.shape)
        assert x.sharding.spec == PartitionSpec("trial"), (name, x.sharding)
        shards = x.addressable_shards
        assert len({s.device for s in shards}) == 4, (name, shards)
        assert all(s.data.shape[0] == num_trials_padded // 4 for s in shards), (name, [s.data.shape for s in shards])
    assert not np.asarray(data.mask)[6:].any() and not np.asarray(data.lengths)[6:].any()  # empty padding

# 6 trials (not a multiple of 4: two padding trials), ragged lengths, a missing entry
rng = np.random.default_rng(0)
N, T = 6, 30
z = (np.arange(N * T).reshape(N, T) // 7) % 2
y = rng.normal(size=(N, T, 2)) + 1.0 * z[..., None]  # overlapping states: EM still moving after 8 iterations
lengths = np.array([30, 21, 30, 17, 30, 26])
mask = np.ones_like(y, bool)
mask[1, 3, 0] = False
model = HMM(num_states=2, obs_dim=2, emission="diag_gaussian")

def same(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=what)

# ---- EM ----
kw = dict(mask=mask, lengths=lengths, num_iters=8, num_restarts=2, seed=1)
one = fit_em(model, y, **kw)
four = fit_em(model, y, devices=4, **kw)
check_placed(8)
# a run stopped by the tolerance could stop one iteration apart on rounding; this one runs all 8
assert not one.diagnostics["converged"] and len(one.diagnostics["log_likelihoods"]) == 9
same(one.diagnostics["log_likelihoods"], four.diagnostics["log_likelihoods"], "EM log-likelihood history")
same(one.diagnostics["restart_objectives"], four.diagnostics["restart_objectives"], "EM restart objectives")
for name in one.params:
    same(one.params[name], four.params[name], f"EM {name}")
for group in ("log_likelihood", "posterior_states"):  # per-trial outputs: 6 trials, padding stripped
    from ppl_switch.results import get_group
    a, b = get_group(one.idata, group), get_group(four.idata, group)
    for var in a.data_vars:
        same(a[var].values, b[var].values, f"EM {group}/{var}")
assert four.data.num_trials == N and four.config["num_devices"] == 4

# ---- LDS EM (the program alone) ----
lds = LDS(latent_dim=1, obs_dim=2, dynamics_cov="diagonal", initial_cov="learned")
data = lds.prepare(y, mask=mask, lengths=lengths)
p1, h1 = lds_em(lds, data, num_iters=5, num_restarts=2, key=jax.random.PRNGKey(0))
p4, h4 = lds_em(lds, data, num_iters=5, num_restarts=2, key=jax.random.PRNGKey(0), devices=4)
check_placed(8)
same(h1["log_likelihoods"], h4["log_likelihoods"], "LDS EM log-likelihood history")
for name in p1:
    same(p1[name], p4[name], f"LDS EM {name}")

# ---- SVI ----
# a small hand-written guide (the default AutoNormal's initialisation alone costs ~12 s of CPU here); its
# Normal means make every step draw noise, so the replicated random stream is checked too
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

def guide(data):
    pi = numpyro.param("pi", np.full(2, 0.5), constraint=constraints.simplex)
    P = numpyro.param("P", np.array([[0.8, 0.2], [0.2, 0.8]]), constraint=constraints.simplex)
    m = numpyro.param("m", np.array([[-0.5, -0.5], [0.5, 0.5]]))
    s = numpyro.param("s", np.ones((2, 2)), constraint=constraints.positive)
    numpyro.sample("initial_probs", dist.Delta(pi, event_dim=1))
    numpyro.sample("transition_matrix", dist.Delta(P, event_dim=2))
    numpyro.sample("means", dist.Normal(m, 0.1).to_event(2))
    numpyro.sample("scales", dist.Delta(s, event_dim=2))

kw = dict(mask=mask, lengths=lengths, guide=guide, num_steps=6, num_draws=2, progress_bar=False, relabel=False, seed=2)
one = fit_svi(model, y, **kw)
four = fit_svi(model, y, devices=4, **kw)
check_placed(8)
same(one.losses, four.losses, "SVI losses")
for name in one.params:
    same(one.params[name], four.params[name], f"SVI {name}")
for name in one.samples:
    same(one.samples[name], four.samples[name], f"SVI draws {name}")
print("ok")
"""


def _run_four_devices(tmp_path, script=FOUR_DEVICES_SCRIPT):
    from subprocess_env import checkout_env

    # keep the test run's XLA flags (conftest: no LLVM optimisation in the default run) and add 4 host devices
    flags = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    return subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=checkout_env(XLA_FLAGS=flags),
                          capture_output=True, text=True, timeout=600)


def test_four_devices_match_one_device(tmp_path):
    """fit_em (HMM), the LDS EM and fit_svi on 4 host devices, 6 trials (2 padding trials): the data is split
    over the 4 devices, and histories, parameters, draws and per-trial outputs equal the 1-device ones."""
    result = _run_four_devices(tmp_path)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-4000:]


def test_padding_trials_are_empty():
    data = SequenceData(np.ones((3, 4, 2)), np.ones((3, 4, 2), bool), np.array([4, 2, 3], np.int32), np.ones((3, 4, 1)))
    padded = pad_trials(data, 4)
    assert padded.y.shape == (4, 4, 2) and padded.inputs.shape == (4, 4, 1)
    assert not padded.mask[3].any() and padded.lengths[3] == 0 and not padded.y[3].any() and not padded.inputs[3].any()
    np.testing.assert_array_equal(padded.mask[:3], data.mask)
    assert pad_trials(data, 3) is data


def test_masked_program_drops_padding_trials():
    """The SVI wrapper masks every site of the "trial" plate to the trials of length > 0: a length-0 trial
    adds exactly nothing, even one made to look observed (which the unwrapped program would count)."""
    import jax
    from numpyro.infer.util import log_density

    model = HMM(num_states=2, obs_dim=1, emission="diag_gaussian")
    data = jax.tree.map(np.asarray, model.prepare(np.random.default_rng(0).normal(size=(3, 5, 1))))
    params = {"initial_probs": np.array([0.3, 0.7]), "transition_matrix": np.array([[0.9, 0.1], [0.2, 0.8]]),
              "means": np.array([[0.0], [1.0]]), "scales": np.array([[1.0], [2.0]])}
    padded = pad_trials(data, 4)
    y, mask = padded.y.copy(), padded.mask.copy()
    y[3], mask[3] = 5.0, True  # trial 3: length 0 but made to look observed
    padded = padded._replace(y=y, mask=mask)
    lp3, _ = log_density(mask_padded_trials(model.program), (data,), {}, params)
    lp4, _ = log_density(mask_padded_trials(model.program), (padded,), {}, params)
    raw4, _ = log_density(model.program, (padded,), {}, params)
    np.testing.assert_allclose(float(lp4), float(lp3), rtol=1e-7)
    assert abs(float(raw4) - float(lp3)) > 1.0


def test_devices_argument_errors():
    with pytest.raises(ValueError, match="devices: expected 1 to"):
        resolve_mesh(10_000)
    with pytest.raises(ValueError, match="devices: expected None"):
        resolve_mesh("cpu")
    y = np.random.default_rng(0).normal(size=(2, 10, 1))
    clds = CLDS(latent_dim=1, obs_dim=1)
    with pytest.raises(ValueError, match=r"^devices: the EM of CLDS does not shard"):
        fit_em(clds, y, devices=1)
    with pytest.raises(ValueError, match="devices: fit_nuts places one chain per device; 2 chains need at least 2"):
        fit_nuts(HMM(2, obs_dim=1), y, num_chains=2, devices=1)


def _padded(arrays, extra):
    """Per-trial arrays with ``extra`` length-0 trials appended (zeros, masks False), as devices= pads."""
    return [np.concatenate([a, np.zeros((extra,) + a.shape[1:], a.dtype)]) for a in arrays]


@pytest.mark.float64
def test_padding_trials_add_nothing_to_the_slds_and_rslds_ems():
    """The SLDS EM (its symmetry-breaking step and iterations) and the rSLDS Laplace EM on 3 trials, and on
    the same 3 plus 2 empty trials (what devices= adds): same objective trace and parameters to 1e-10. A
    padding trial's initial-state statistics or ELBO terms (not 0: its q(x) follows the prior) would shift both."""
    import jax
    import jax.numpy as jnp

    import ppl_switch.infer.rslds_laplace_em as lem
    from ppl_switch.models import RSLDS
    from ppl_switch.models.slds import em_initial_params
    from ppl_switch.ops import switching as sw

    B, T = 3, 12
    model = RSLDS(num_states=2, latent_dim=2, obs_dim=3)
    data = model.prepare(np.asarray(model.simulate(jax.random.PRNGKey(1), B, T)[0].y), lengths=np.array([12, 7, 10]))
    p = {k: jnp.asarray(v) for k, v in em_initial_params(model, data, np.random.default_rng(0)).items()}
    y, m, tm = np.asarray(data.y), np.asarray(data.mask), np.asarray(data.time_mask)
    u = np.zeros((B, T, 0))
    gamma = np.random.default_rng(2).dirichlet(np.ones(2), (B, T))
    prior = model.em_prior(3)
    learn = frozenset(sw.EM_GROUPS)

    @jax.jit
    def slds(gamma, y, m, tm, u):
        p1 = sw.em_init_step(p, gamma, y, m, tm, u, prior, learn, True)
        p2, trace, _ = sw.structured_mean_field_em(p1, gamma, y, m, tm, u, prior, learn, 2, True)
        return p1, p2, trace

    t_prior = model.transition_prior()

    @jax.jit
    def rslds(gamma, y, m, tm, u):
        pairwise = gamma[:, :-1, :, None] * gamma[:, 1:, None, :]
        state = lem.LaplaceEMState(p, dict(t_prior.loc), gamma, pairwise, jnp.zeros(y.shape[:2] + (2,)), jnp.ones(y.shape))
        out, trace, _ = lem.laplace_em(state, y, m, tm, u, prior, t_prior, (1.0, 1.0), kind=model.transitions,
                                       emission="gaussian", learn=learn, num_iters=2, num_newton=2, diagonal=True,
                                       tied=False)
        return out.params, out.transitions, trace

    for run in (slds, rslds):
        plain = run(gamma, y, m, tm, u)
        padded = run(*_padded([gamma, y, m, tm, u], 2))
        for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(padded)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-10, atol=1e-12)


SLDS_FAMILY_FOUR_DEVICES_SCRIPT = r"""
import numpy as np
import jax
from jax.sharding import PartitionSpec
jax.config.update("jax_enable_x64", True)  # float64: a real difference is not hidden by rounding
import ppl_switch.infer.rslds_em as rslds_em_mod
import ppl_switch.infer.slds_em as slds_em_mod
from ppl_switch.models import RSLDS, SLDS

assert len(jax.devices()) == 4, jax.devices()
placed = []
for module in (slds_em_mod, rslds_em_mod):
    inner = module.shard_trials
    module.shard_trials = lambda *a, inner=inner, **k: placed.append(inner(*a, **k)) or placed[-1]

N, T = 5, 20  # 5 trials on 4 devices: 3 padding trials
lengths = np.array([20, 13, 20, 9, 17])
for cls, em in ((SLDS, slds_em_mod.slds_em), (RSLDS, rslds_em_mod.rslds_em)):
    model = cls(num_states=2, latent_dim=2, obs_dim=3)
    mask = np.ones((N, T, 3), bool)
    mask[1, 3, 0] = False
    data = model.prepare(np.asarray(model.simulate(jax.random.PRNGKey(3), N, T)[0].y), mask=mask, lengths=lengths)
    kw = dict(key=jax.random.PRNGKey(0), num_iters=3, num_restarts=1)
    p1, h1 = em(model, data, **kw)
    p4, h4 = em(model, data, devices=4, **kw)
    y = placed.pop().y
    assert y.shape[0] == 8 and y.sharding.spec == PartitionSpec("trial") and len({s.device for s in y.addressable_shards}) == 4
    np.testing.assert_allclose(h4["log_likelihoods"], h1["log_likelihoods"], rtol=1e-10)
    for k in p1:  # includes q(x) means and q(z) of the 5 real trials (padding cut off)
        np.testing.assert_allclose(p4[k], p1[k], rtol=1e-8, atol=1e-10, err_msg=f"{cls.__name__} {k}")
print("ok")
"""


@pytest.mark.slow
def test_slds_and_rslds_ems_on_four_devices_match_one_device(tmp_path):
    """The SLDS and rSLDS EMs with devices=4 (5 trials: 3 padding trials, ragged, a missing entry): data
    split over 4 devices, objective history, parameters and per-trial q equal one device's (float64).
    Slow (65 s wall, 96 s CPU on 2 cores: four compilations); the default run checks the padding itself
    (test_padding_trials_add_nothing_to_the_slds_and_rslds_ems)."""
    result = _run_four_devices(tmp_path, SLDS_FAMILY_FOUR_DEVICES_SCRIPT)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-4000:]
