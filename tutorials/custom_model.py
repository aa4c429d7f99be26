# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

"""Write your own model: change an emission of an existing model, and build a new switching model.

What a model provides (``ppl_switch.models.Model``; the runners ``fit_svi`` / ``fit_nuts`` / ``fit``
call only these):

=========================== ========================================================================
method                      what uses it, and what happens today when it is missing
=========================== ========================================================================
``program(data, *,          the NumPyro program every runner fits. Missing: the base class's bare
record_log_lik=False)``     ``NotImplementedError`` naming the class and ``program()`` (section 4).
``site_dims()``             named dims of the posterior sites in InferenceData; deterministic sites it
                            lists are also written. Missing: the fit runs; dims are
                            ``<site>_dim_<i>``, deterministic sites are dropped, and a
                            ``fit.warnings`` entry (FitWarning) says so.
``config()``                constructor arguments as JSON: the sidecar of ``fit.save`` and the key that
                            lets a second fit of the same model reuse compiled code. Missing: fits run
                            (nothing is cached); ``fit.save`` raises ``NotImplementedError`` naming
                            ``config()`` before it writes anything.
``default_guide()``         SVI's guide. Missing: ``MeanFieldNormal(program, init_loc_fn=init_to_median(
                            num_samples=15))`` (AutoNormal's family, compiled set-up); on section 2's data it reached the same loss and state
                            accuracy as the ``init_to_sample`` guide the HMM uses.
``log_likelihood(params,    the ``log_likelihood`` group (trial, time), for LOO. Missing: group absent,
data)``                     and a ``fit.warnings`` entry (FitWarning) names the method.
``posterior_predictive(key, the ``posterior_predictive`` group. Missing: as above.
params, data)``
``state_posterior(params,   models with ``num_states > 0``: the ``posterior_states`` group (smoothed
data)``, ``sample_states``  marginals, Viterbi, sampled paths). Missing: as above.
``state_features``,         relabelling of states across draws before anything is written. Missing:
``permute_states``          draws are written unaligned, and a ``fit.warnings`` entry says so.
``simulate``,               not called by the runners; used by tests, tutorials and ``ppl-switch
``default_params``          simulate``.
``em`` (optional)           a closed-form EM for ``fit_em``; a subclass of a built-in model gets the
                            library's EM for its class (``em = None``: none). Missing: ``fit_em`` raises
                            ``NotImplementedError`` naming the model.
``fixed_point_kind``,       the ``fixed_points`` group ``ppl-switch fit`` adds: e.g. ``"affine"`` with
``affine_dynamics``         ``affine_dynamics(samples, obs_dim)`` returning the maps x -> A x + b.
(optional)                  Missing: no group.
=========================== ========================================================================

A missing ``log_likelihood`` / ``posterior_predictive`` / ``state_posterior`` does not fail the fit: the
group is absent, the InferenceData attribute ``skipped`` lists it, and ``fit.warnings`` names the method
that would fill it (section 4 checks both). A subclass of ``HMM`` gets the HMM's EM (``fit_em`` finds the
library's EM by the model's class) and ``recommended_runner = ("em", {})``; that EM's M-step is Gaussian, so it
refuses a subclass whose emission differs (``NotImplementedError`` naming the overridden method). Set
``em = None`` (this model has no EM) and a runner of your own (section 1).

Run with ``PPL_SWITCH_SMOKE=1`` (the test suite does) for tiny sizes; every key number is asserted.
"""

# %% [markdown]
# # Write your own model
#
# Two ways to get a model the library does not ship:
#
# 1. **subclass a model and override one piece** -- here the HMM with Student-t instead of Gaussian
#    emissions;
# 2. **write a new program from the library's distributions** -- here an HMM whose transition matrix
#    depends on a known input u_t through a softmax link, with the state path summed out by
#    `ppl_switch.distributions.hmm.MarginalHMM`.
#
# Both are then fitted with the ordinary runners (`fit_svi`, `fit_nuts`) and give InferenceData with the
# named dims of `site_dims()`. Section 4 shows what the runners do with a model that implements only the
# minimum.

# %%
import itertools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.handlers import seed, substitute, trace
from numpyro.infer.initialization import init_to_sample
from scipy.special import logsumexp
from scipy.stats import norm

from ppl_switch.analysis.metrics import matched_state_accuracy
from ppl_switch.data import as_sequence_data
from ppl_switch.distributions.hmm import MarginalHMM
from ppl_switch.guides.mean_field import MeanFieldNormal
from ppl_switch.infer import fit_nuts, fit_svi, load, posterior_predictive_draws
from ppl_switch.models import HMM, MODELS, Model
from ppl_switch.models.hmm import sample_markov_chain
from ppl_switch.results import get_group, global_attrs, group_names

SMOKE = os.environ.get("PPL_SWITCH_SMOKE", "0") == "1"
OUT = os.environ.get("PPL_SWITCH_TUTORIAL_OUT", ".")
START = time.perf_counter()

# %% [markdown]
# ## 1. Change the emission of an existing model: a Student-t HMM
#
# `HMM.program` samples the chain, calls `sample_emission_params` and hands
# `emission_log_likelihoods(params, data)` ((trials, T, K), masked entries 0) to the forward filter; the
# state posterior, the sampled paths and the pointwise log-likelihood are all computed from
# `emission_log_likelihoods` too. So the emission change needs:
#
# * `sample_emission_params` (the new `df` site) and `emission_log_likelihoods` (the new density);
# * `site_dims` (the new site's dims) and `config` (the constructor changed);
# * `posterior_predictive` and `simulate` (the inherited ones draw Gaussian noise) and `default_params`
#   (add `df`);
# * `em = None` and `recommended_runner`: the HMM's EM is the Gaussian Baum-Welch (it refuses this subclass).
#
# `program`, `log_likelihood`, `state_posterior`, `sample_states`, `state_features` (the means) and
# `permute_states` (by `site_dims`) are inherited unchanged.

# %%
DF_PRIOR_SHAPE, DF_PRIOR_RATE = 2.0, 0.1  # Gamma(2, 0.1) on the degrees of freedom: mean 20


class StudentTHMM(HMM):
    """HMM with y_t | z_t = k ~ StudentT(df, mu_k, s_k) per coordinate, df ~ Gamma(2, 0.1) shared."""

    name = "student_t_hmm"
    recommended_runner = ("svi", {"learning_rate": 0.05})
    em = None  # no EM: the HMM's (Gaussian Baum-Welch) does not fit this emission, so ppl_switch.fit must not try it

    def __init__(self, num_states, obs_dim=None, sticky=0.0):
        super().__init__(num_states, obs_dim, emission="diag_gaussian", sticky=sticky)

    def config(self):
        return {"num_states": self.num_states, "obs_dim": self.obs_dim, "sticky": self.sticky}

    def site_dims(self):
        return {**super().site_dims(), "df": ()}

    def sample_emission_params(self, obs_dim):
        params = super().sample_emission_params(obs_dim)  # means, scales (diag_gaussian)
        params["df"] = numpyro.sample("df", dist.Gamma(DF_PRIOR_SHAPE, DF_PRIOR_RATE))
        return params

    def emission_log_likelihoods(self, params, data):
        y = jnp.asarray(data.y)[..., None, :]  # (trials, T, 1, D) against (K, D)
        mask = jnp.asarray(data.mask)[..., None, :]
        log_prob = dist.StudentT(params["df"], params["means"], params["scales"]).log_prob(jnp.where(mask, y, 0.0))
        return jnp.where(mask, log_prob, 0.0).sum(-1)  # observed coordinates only

    def emit(self, key, params, states):
        means = jnp.asarray(params["means"])[states]
        noise = jax.random.t(key, jnp.asarray(params["df"]), means.shape, means.dtype)
        return means + jnp.asarray(params["scales"])[states] * noise

    def posterior_predictive(self, key, params, data):
        key_z, key_y = jax.random.split(key)
        return self.emit(key_y, params, self.sample_states(key_z, params, data))

    def simulate(self, key, num_trials, num_timesteps, *, params=None, inputs=None):
        if inputs is not None:
            raise ValueError("inputs: the Student-t HMM takes no inputs")
        key_params, key_z, key_y = jax.random.split(key, 3)
        params = self.default_params(key_params) if params is None else dict(params)

        @jax.jit  # one compiled program instead of op-by-op dispatch
        def draw(key_z, key_y, params):
            chain = lambda k: sample_markov_chain(k, *self.chain_params(params), num_timesteps)  # noqa: E731
            states = jax.vmap(chain)(jax.random.split(key_z, num_trials))
            return states, self.emit(key_y, params, states)

        states, y = draw(key_z, key_y, {name: jnp.asarray(value) for name, value in params.items()})
        data = as_sequence_data(np.asarray(y), obs_dim=y.shape[-1], input_dim=0)
        return data, {"params": params, "states": np.asarray(states)}

    def default_params(self, key):
        return {**super().default_params(key), "df": jnp.asarray(3.0)}


def program_log_factor(model, params, data):
    """The data term the program adds (its ``y`` factor), at fixed parameters."""

    @jax.jit
    def factor(params, data):
        tr = trace(substitute(seed(model.program, 0), data=params)).get_trace(data)
        return jnp.sum(tr["y"]["fn"].log_prob(tr["y"]["value"]))

    return float(factor(params, data))


# %% [markdown]
# Simulate two trials with t(3) noise (outliers a Gaussian would read as state switches), check that the
# program's data term is the sum of the pointwise log-likelihood and that the replicated data the runners
# write (`posterior_predictive_draws`, here at the true parameters) have the t tails, then fit by SVI (full
# run only: the fit compiles for about 30 s of CPU; the smoke run fits section 2's model instead).

# %%
st_model = StudentTHMM(num_states=2, obs_dim=1)
st_true = st_model.default_params(jax.random.PRNGKey(10))  # means -3, +3; scale 0.6; stay 0.9; df 3
st_data, st_truth = st_model.simulate(jax.random.PRNGKey(11), 2, 150 if SMOKE else 500, params=st_true)

factor = program_log_factor(st_model, st_true, st_data)
pointwise = float(np.sum(jax.jit(st_model.log_likelihood)(st_true, st_data)))
print(f"Student-t HMM: program data term {factor:.4f}, sum of log_likelihood {pointwise:.4f}")
assert abs(factor - pointwise) < 1e-4 * abs(factor), (factor, pointwise)

# 64 copies of the true parameters as (chain, draw) "draws"; values beyond 4 scales outside both means
truth_draws = {name: np.broadcast_to(np.asarray(value), (1, 64) + np.shape(value)) for name, value in st_true.items()}
replicated = posterior_predictive_draws(st_model, truth_draws, st_data, jax.random.PRNGKey(12))
tail = float(np.mean(np.abs(replicated) > 3.0 + 4 * 0.6))
print(f"replicates beyond 4 scales: {tail:.4f} (t(3): 0.0140; a Gaussian: 0.00003)")
assert 0.007 < tail < 0.03, tail

if not SMOKE:
    st_fit = fit_svi(st_model, st_data, num_steps=3000, learning_rate=0.05, seed=0, progress_bar=False)
    st_est = st_fit.point_estimate()
    st_means = np.sort(st_est["means"][:, 0])
    st_probs = np.asarray(get_group(st_fit.idata, "posterior_states")["state_probs"])
    st_accuracy = matched_state_accuracy(st_truth["states"].ravel(), st_probs.argmax(-1).ravel(), num_states=2)
    print(st_fit)
    print(f"means {np.round(st_means, 3)} (true -3, 3), df {float(st_est['df']):.2f} (true 3, prior mean 20), "
          f"state accuracy {st_accuracy:.3f}")
    assert np.all(np.abs(st_means - np.array([-3.0, 3.0])) < 0.3), st_means
    assert float(st_est["df"]) < 10.0, st_est["df"]  # heavy tails found: far below the prior mean
    assert st_accuracy >= 0.97, st_accuracy
    assert get_group(st_fit.idata, "posterior")["df"].dims == ("chain", "draw")

# %% [markdown]
# ## 2. A new switching model: transitions driven by an input
#
# States k = 0..K-1, observations y_t in R^D, a known input u_t in R^U:
#
#     pi ~ Dirichlet(1),  b_ij ~ N(0, 2^2),  w_j ~ N(0, 2^2 I_U),  mu_k ~ N(0, 5^2 I),  s_k ~ HalfNormal(2)
#     z_0 ~ Cat(pi),  p(z_t = j | z_{t-1} = i, u_t) = softmax_j(b_ij + w_j . u_t)     (t = 1..T-1)
#     y_t | z_t = k ~ N(mu_k, diag(s_k^2))
#
# The transition matrices differ per trial and step: (trials, T-1, K, K). `MarginalHMM` takes them as
# they are (time-varying), sums the state path out with the forward filter and also gives the per-step
# log-likelihoods, the smoother, Viterbi and FFBS that the runners' decoding needs. A softmax is invariant
# to adding a constant to every w_j, so only differences such as w_1 - w_0 are identified (the prior keeps
# the rest finite); the checks below use that difference.
#
# The class is split in two to show the minimum a runner needs (`CovariateHMMCore`: program, site_dims,
# config) and the rest (`CovariateHMM`).

# %%
BIAS_PRIOR_SCALE, WEIGHT_PRIOR_SCALE, MEAN_PRIOR_SCALE, SCALE_PRIOR_SCALE = 2.0, 2.0, 5.0, 2.0


def covariate_transitions(transition_bias, input_weights, inputs):
    """(..., T-1, K, K) with [t-1, i, j] = p(z_t = j | z_{t-1} = i, u_t) = softmax_j(b_ij + w_j . u_t)."""
    drive = jnp.einsum("ju,...tu->...tj", input_weights, inputs[..., 1:, :])  # (..., T-1, K): w_j . u_t
    return jax.nn.softmax(transition_bias + drive[..., None, :], axis=-1)


def gaussian_log_likelihoods(means, scales, y, mask):
    """(..., T, K) log N(y_t | mu_k, diag(s_k^2)) over the observed coordinates (0 where none is)."""
    y, mask = y[..., None, :], mask[..., None, :]
    log_prob = dist.Normal(means, scales).log_prob(jnp.where(mask, y, 0.0))
    return jnp.where(mask, log_prob, 0.0).sum(-1)


class CovariateHMMCore(Model):
    """The minimum: the program, its site dims and its config."""

    name = "covariate_hmm"
    recommended_runner = ("svi", {"learning_rate": 0.05})

    def __init__(self, num_states, obs_dim, input_dim=1):
        self.num_states, self.obs_dim, self.input_dim = int(num_states), int(obs_dim), int(input_dim)

    def config(self):
        return {"num_states": self.num_states, "obs_dim": self.obs_dim, "input_dim": self.input_dim}

    def site_dims(self):
        return {
            "initial_probs": ("state",),
            "transition_bias": ("state", "state_to"),
            "input_weights": ("state", "input"),
            "means": ("state", "obs"),
            "scales": ("state", "obs"),
        }

    def marginal_hmm(self, params, data) -> MarginalHMM:
        """The chain given one parameter set, batched over trials."""
        y, mask, inputs = jnp.asarray(data.y), jnp.asarray(data.mask), jnp.asarray(data.inputs)
        log_liks = gaussian_log_likelihoods(params["means"], params["scales"], y, mask)
        transitions = covariate_transitions(params["transition_bias"], params["input_weights"], inputs)
        step_observed = mask.any(-1)  # padded / fully missing steps carry no likelihood
        return MarginalHMM(params["initial_probs"], transitions, log_liks, mask=step_observed, time_varying=True)

    def program(self, data, *, record_log_lik=False):
        K, D, U = self.num_states, data.obs_dim, self.input_dim
        params = {
            "initial_probs": numpyro.sample("initial_probs", dist.Dirichlet(jnp.ones(K))),
            "transition_bias": numpyro.sample(
                "transition_bias", dist.Normal(0.0, BIAS_PRIOR_SCALE).expand([K, K]).to_event(2)
            ),
            "input_weights": numpyro.sample(
                "input_weights", dist.Normal(0.0, WEIGHT_PRIOR_SCALE).expand([K, U]).to_event(2)
            ),
            "means": numpyro.sample("means", dist.Normal(0.0, MEAN_PRIOR_SCALE).expand([K, D]).to_event(2)),
            "scales": numpyro.sample("scales", dist.HalfNormal(SCALE_PRIOR_SCALE).expand([K, D]).to_event(2)),
        }
        hmm = self.marginal_hmm(params, data)
        with numpyro.plate("trial", data.num_trials):
            numpyro.factor("y", hmm.log_prob_marginal())  # log p(y_n), the state path summed out
        if record_log_lik:
            numpyro.deterministic("log_lik", hmm.step_log_likelihoods())


def sample_covariate_chain(key, initial_probs, transitions):
    """(T,) path: z_0 ~ Cat(initial_probs), z_t ~ Cat(transitions[t - 1, z_{t-1}])."""
    key_0, key_rest = jax.random.split(key)
    z_0 = jax.random.categorical(key_0, jnp.log(initial_probs))

    def step(z_prev, key_and_matrix):
        k, matrix = key_and_matrix
        z = jax.random.categorical(k, jnp.log(matrix[z_prev]))
        return z, z

    _, rest = jax.lax.scan(step, z_0, (jax.random.split(key_rest, transitions.shape[0]), transitions))
    return jnp.concatenate([z_0[None], rest]).astype(jnp.int32)


class CovariateHMM(CovariateHMMCore):
    """Everything the runners and the tests use."""

    def default_guide(self):
        # as the HMM's: mean-field Gaussian started at a prior draw, so the states start apart. numpyro's
        # AutoNormal(self.program, init_loc_fn=init_to_sample, init_scale=0.1) gives the same numbers;
        # MeanFieldNormal finds its start in one compiled program instead of one compilation per operation
        return MeanFieldNormal(self.program, init_loc_fn=init_to_sample, init_scale=0.1)

    # ----- per-draw quantities written to InferenceData (jit/vmap-able) -----
    def log_likelihood(self, params, data):
        return self.marginal_hmm(params, data).step_log_likelihoods()  # (trials, T), 0 where unobserved

    def state_posterior(self, params, data):
        hmm = self.marginal_hmm(params, data)
        return {"state_probs": hmm.smoother().smoothed_probs, "viterbi": hmm.viterbi()}

    def sample_states(self, key, params, data):
        return self.marginal_hmm(params, data).sample_states(key)

    def emit(self, key, params, states):
        means = jnp.asarray(params["means"])[states]
        return means + jnp.asarray(params["scales"])[states] * jax.random.normal(key, means.shape, means.dtype)

    def posterior_predictive(self, key, params, data):
        key_z, key_y = jax.random.split(key)
        return self.emit(key_y, params, self.sample_states(key_z, params, data))

    # ----- relabelling states across draws -----
    def state_features(self, params):
        return np.asarray(params["means"])

    def permute_states(self, params, perm):
        """New state k = old state perm[k], along every axis named "state" or "state_to"."""
        out, dims = dict(params), self.site_dims()
        for name, site_dims in dims.items():
            for axis, dim in enumerate(site_dims):
                if name in out and dim in ("state", "state_to"):
                    out[name] = np.take(np.asarray(out[name]), perm, axis=axis - len(site_dims))
        return out

    # ----- simulation -----
    def default_params(self, key):
        """Stay logit 2 (p(stay) = 0.88 at u = 0), w = linspace(-1, 1) on input 0 (w_1 - w_0 = 2 for K = 2),
        means +-2 apart per coordinate, scales 0.5."""
        K, D, U = self.num_states, self.obs_dim, self.input_dim
        weights = np.zeros((K, U))
        weights[:, 0] = np.linspace(-1.0, 1.0, K)
        means = np.linspace(-2.0, 2.0, K)[:, None] * (-1.0) ** np.arange(D)[None, :]
        return {
            "initial_probs": jnp.full(K, 1.0 / K),
            "transition_bias": jnp.asarray(2.0 * np.eye(K)),
            "input_weights": jnp.asarray(weights),
            "means": jnp.asarray(means),
            "scales": jnp.full((K, D), 0.5),
        }

    def simulate(self, key, num_trials, num_timesteps, *, params=None, inputs=None):
        key_params, key_u, key_z, key_y = jax.random.split(key, 4)
        params = self.default_params(key_params) if params is None else dict(params)
        if inputs is None:  # i.i.d. N(0, 1) inputs
            inputs = jax.random.normal(key_u, (num_trials, num_timesteps, self.input_dim))
        inputs = jnp.asarray(inputs, jnp.result_type(float))

        @jax.jit
        def draw(key_z, key_y, params, inputs):
            transitions = covariate_transitions(params["transition_bias"], params["input_weights"], inputs)
            keys = jax.random.split(key_z, num_trials)
            states = jax.vmap(sample_covariate_chain, in_axes=(0, None, 0))(keys, params["initial_probs"], transitions)
            return states, self.emit(key_y, params, states)

        states, y = draw(key_z, key_y, {name: jnp.asarray(value) for name, value in params.items()}, inputs)
        data = as_sequence_data(
            np.asarray(y), inputs=np.asarray(inputs), input_dim=self.input_dim, obs_dim=self.obs_dim
        )
        return data, {"params": params, "states": np.asarray(states)}


# %% [markdown]
# ### The likelihood against an independent computation
#
# On a tiny case (3 states, 6 steps, 2 inputs, one fully and one partly missing step) the model's
# log-likelihood must equal the log-sum over all 3^6 state paths, computed with NumPy/SciPy alone from
# the equations above.

# %%
def brute_force_log_likelihood(params, y, mask, inputs):
    """log p(y) of one trial by enumerating every state path (no JAX, no library code)."""
    p = {name: np.asarray(value, dtype=float) for name, value in params.items()}
    T, K = y.shape[0], p["means"].shape[0]
    emission = np.array(
        [[norm.logpdf(y[t], p["means"][k], p["scales"][k])[mask[t]].sum() for k in range(K)] for t in range(T)]
    )
    paths = []
    for path in itertools.product(range(K), repeat=T):
        log_p = np.log(p["initial_probs"][path[0]]) + emission[0, path[0]]
        for t in range(1, T):
            logits = p["transition_bias"][path[t - 1]] + p["input_weights"] @ inputs[t]
            log_p += logits[path[t]] - logsumexp(logits) + emission[t, path[t]]
        paths.append(log_p)
    return float(logsumexp(paths))


rng = np.random.default_rng(0)
tiny = CovariateHMM(num_states=3, obs_dim=2, input_dim=2)
tiny_params = {
    "initial_probs": jnp.asarray([0.5, 0.3, 0.2]),
    "transition_bias": jnp.asarray(rng.normal(0.0, 1.0, (3, 3))),
    "input_weights": jnp.asarray(rng.normal(0.0, 1.0, (3, 2))),
    "means": jnp.asarray(rng.normal(0.0, 1.5, (3, 2))),
    "scales": jnp.asarray(rng.uniform(0.5, 1.5, (3, 2))),
}
tiny_y, tiny_u = rng.normal(0.0, 1.5, (1, 6, 2)), rng.normal(0.0, 1.0, (1, 6, 2))
tiny_mask = np.ones((1, 6, 2), bool)
tiny_mask[0, 2, :] = False  # step 2 fully missing
tiny_mask[0, 4, 1] = False  # step 4: only coordinate 0 observed
tiny_data = tiny.prepare(tiny_y, mask=tiny_mask, inputs=tiny_u)
tiny_steps = np.asarray(jax.jit(tiny.log_likelihood)(tiny_params, tiny_data))
exact = brute_force_log_likelihood(tiny_params, tiny_y[0], tiny_mask[0], tiny_u[0])
tiny_factor = program_log_factor(tiny, tiny_params, tiny_data)
print(f"tiny case: log_likelihood sum {tiny_steps.sum():.5f}, program data term {tiny_factor:.5f}, "
      f"brute force over 3^6 paths {exact:.5f}")
assert abs(tiny_steps.sum() - exact) < 1e-4 * abs(exact), (tiny_steps.sum(), exact)
assert abs(tiny_factor - exact) < 1e-4 * abs(exact), (tiny_factor, exact)
assert tiny_steps[0, 2] == 0.0  # a fully missing step contributes exactly 0

# %% [markdown]
# ### Fit simulated data with a known covariate weight
#
# Two states, two observed coordinates, one input; the truth has w_1 - w_0 = 2 (a large u_t pushes the
# chain into state 1). One trial has a ragged end, the other a few missing entries.

# %%
model = CovariateHMM(num_states=2, obs_dim=2, input_dim=1)
true_params = model.default_params(jax.random.PRNGKey(0))
num_trials, num_steps = (2, 150) if SMOKE else (4, 400)
sim, truth = model.simulate(jax.random.PRNGKey(1), num_trials=num_trials, num_timesteps=num_steps, params=true_params)
y = np.array(sim.y)
y[1, num_steps - num_steps // 5 :] = np.nan  # trial 1 is shorter...
y[0, 10:15, 1] = np.nan  # ...and trial 0 misses five entries of coordinate 1
lengths = [num_steps, num_steps - num_steps // 5] + [num_steps] * (num_trials - 2)
data = model.prepare(y, lengths=lengths, inputs=np.asarray(sim.inputs))
TRUE_CONTRAST = float(true_params["input_weights"][1, 0] - true_params["input_weights"][0, 0])


def aligned_to_truth(fit):
    """Draws with the states ordered like the truth (by the first coordinate of the means)."""
    return model.permute_states(fit.samples, np.argsort(fit.point_estimate()["means"][:, 0]))


def weight_contrast(draws):
    """(chain, draw) draws of w_1 - w_0 on input 0."""
    return draws["input_weights"][..., 1, 0] - draws["input_weights"][..., 0, 0]


valid = np.arange(num_steps)[None, :] < np.array(lengths)[:, None]


def accuracy_of(fit):
    probs = np.asarray(get_group(fit.idata, "posterior_states")["state_probs"])
    return matched_state_accuracy(truth["states"][valid], probs.argmax(-1)[valid], num_states=2)


# %% [markdown]
# SVI (the model's `default_guide`), then NUTS on the same data.

# %%
# equal draw counts (64) in smoke mode let NUTS reuse the per-draw functions compiled after the SVI fit
NUM_DRAWS = 64 if SMOKE else 1000
svi_fit = fit_svi(model, data, num_steps=800 if SMOKE else 4000, learning_rate=0.05, seed=0, num_draws=NUM_DRAWS,
                  progress_bar=False)
svi_draws = aligned_to_truth(svi_fit)
svi_contrast = weight_contrast(svi_draws)
print(svi_fit)
print(f"SVI: w_1 - w_0 = {svi_contrast.mean():.3f} +- {svi_contrast.std():.3f} (true {TRUE_CONTRAST}), "
      f"state accuracy {accuracy_of(svi_fit):.3f}")

warmup, samples, chains = (50, 64, 1) if SMOKE else (500, 500, 2)
nuts_fit = fit_nuts(model, data, num_warmup=warmup, num_samples=samples, num_chains=chains, seed=2, progress_bar=False)
nuts_draws = aligned_to_truth(nuts_fit)
nuts_contrast = weight_contrast(nuts_draws)
print(nuts_fit)
print(f"NUTS: w_1 - w_0 = {nuts_contrast.mean():.3f} +- {nuts_contrast.std():.3f}, "
      f"P(w_1 - w_0 > 0) = {(nuts_contrast > 0).mean():.3f}, state accuracy {accuracy_of(nuts_fit):.3f}")

# the covariate effect: right sign, and close to the truth (posterior sd about 0.3 smoke, 0.11 full)
tolerance = 0.75 if SMOKE else 0.4
for label, contrast in (("SVI", svi_contrast), ("NUTS", nuts_contrast)):
    assert abs(contrast.mean() - TRUE_CONTRAST) < tolerance, (label, contrast.mean())
assert (nuts_contrast > 0).mean() >= 0.95, (nuts_contrast > 0).mean()
assert accuracy_of(svi_fit) >= 0.95 and accuracy_of(nuts_fit) >= 0.95

# %% [markdown]
# The InferenceData carries the dims of `site_dims()`, the pointwise log-likelihood (0 on the padded
# steps), replicated observations and the decoded states:

# %%
idata = nuts_fit.idata
posterior = get_group(idata, "posterior")
print(posterior["input_weights"].dims, posterior["transition_bias"].dims)
assert posterior["input_weights"].dims == ("chain", "draw", "state", "input")
assert posterior["transition_bias"].dims == ("chain", "draw", "state", "state_to")
expected_groups = {"log_likelihood", "posterior_predictive", "posterior_states", "observed_data", "constant_data"}
assert expected_groups <= set(group_names(idata)), group_names(idata)
log_lik = np.asarray(get_group(idata, "log_likelihood")["y"])
assert log_lik.shape == (chains, samples, num_trials, num_steps) and np.all(log_lik[:, :, 1, lengths[1]:] == 0.0)
replicated = np.asarray(get_group(idata, "posterior_predictive")["y"])
assert np.all(np.isnan(replicated[:, :, 1, lengths[1]:])) and np.all(np.isfinite(replicated[:, :, 0]))
assert global_attrs(idata)["skipped"] == ""

# %% [markdown]
# ## 3. Saving and loading
#
# `fit.save` stores `config()` beside the InferenceData. `load` rebuilds the model by its `name` through
# the registry `ppl_switch.models.MODELS`, so register the class once (or pass `load(path, model=...)`).
# `ppl_switch.fit(model, y, inputs=u)` runs the model's `recommended_runner` (SVI with step size 0.05 here).

# %%
MODELS["covariate_hmm"] = CovariateHMM
path = os.path.join(OUT, "covariate_hmm_fit.nc")
nuts_fit.save(path)
reloaded = load(path)
print(reloaded)
assert type(reloaded.model) is CovariateHMM and reloaded.model.config() == model.config()
assert np.array_equal(reloaded.samples["input_weights"], nuts_fit.samples["input_weights"])
assert np.array_equal(np.asarray(reloaded.data.inputs), np.asarray(data.inputs))

# %% [markdown]
# ## 4. What the runners do with only the minimum
#
# `CovariateHMMCore` has no `log_likelihood`, `posterior_predictive`, `state_posterior` or
# `state_features`. The fit runs; the groups are missing, listed in the attribute `skipped`, and the fit's
# warnings name each method that would fill a group.

# %%
core = CovariateHMMCore(num_states=2, obs_dim=2, input_dim=1)
core_fit = fit_svi(core, data, num_steps=50, seed=0, progress_bar=False)
core_groups = group_names(core_fit.idata)
print("groups:", core_groups, "| skipped:", global_attrs(core_fit.idata)["skipped"], "| warnings:", core_fit.warnings)
assert not {"log_likelihood", "posterior_predictive", "posterior_states"} & set(core_groups)
assert global_attrs(core_fit.idata)["skipped"] == "log_likelihood,posterior_predictive,posterior_states"
named = [w.split(" does not implement ")[1].split("()")[0] for w in core_fit.warnings if " does not implement " in w]
assert named == ["state_features", "log_likelihood", "posterior_predictive", "state_posterior"], core_fit.warnings


class NoProgram(Model):
    name = "no_program"


try:
    fit_svi(NoProgram(), np.zeros((1, 5, 1)), num_steps=5, progress_bar=False)
except NotImplementedError as err:  # the base class names the class and the method to define
    print(f"a model without program: {type(err).__name__}({str(err)!r})")
    assert "NoProgram.program() is not defined" in str(err), err
else:
    raise AssertionError("a model without program fitted")

elapsed = time.perf_counter() - START
print(f"tutorial ran in {elapsed:.1f} s ({'smoke' if SMOKE else 'full'} mode)")
