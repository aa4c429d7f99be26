"""Trials sharded over several devices: the ``devices=`` option of the runners.

The trials (leading axis of every :class:`~ppl_switch.data.SequenceData` array: ``y``, ``mask``,
``lengths``, ``inputs``) are split over a 1-D device mesh axis named ``"trial"`` with
:class:`jax.sharding.NamedSharding`; parameters, restarts' keys and optimiser states are replicated.
The runners' programs are unchanged otherwise: they are jitted functions of the whole (N, T, D) arrays,
so XLA's SPMD partitioner runs the per-trial work (smoothers, emission terms) where each trial lives and
turns the sums over trials (EM sufficient statistics, log-likelihoods, the ELBO and its gradient) into
cross-device reductions inside the compiled program: nothing goes back to the host inside the loop.

Padding. The trial count is padded to a multiple of the number of devices with dummy trials that carry
no observation: ``y = 0``, ``mask = False``, ``length = 0`` (``inputs = 0``). Validated data never has a
length-0 trial (:func:`~ppl_switch.data.as_sequence_data` requires lengths >= 1 and an observed entry per
trial), so ``lengths > 0`` identifies the real trials inside a program (:func:`real_trials`). A fully
masked trial already adds no emission term, no transition pair and no sufficient statistic; what it would
still change, and is therefore excluded explicitly:

* its log marginal (log sum of the chain's prior: 0 only up to rounding): the EM programs zero it,
  :func:`mask_padded_trials` masks every site inside the ``"trial"`` plate for SVI;
* per-trial averages (the learned initial distribution, the LDS initial moments): divided by the number
  of real trials, not by the padded count.

Per-trial results returned to the user (log-likelihoods, state posteriors, predictive draws) are
computed on the unpadded data, so they carry no padding.

Multi-host: call ``jax.distributed.initialize()`` in every process first, then pass ``jax.devices()``
(all processes' devices) or a Mesh over them; every process must pass the same full data (each one
places only its own devices' slices, :func:`jax.make_array_from_callback`). Not tested here (one host).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from numpyro.primitives import Messenger

from ppl_switch.data import SequenceData

#: the mesh axis the trials are split over
TRIAL_AXIS = "trial"

Devices = Union[None, int, Sequence[jax.Device], Mesh]


def resolve_mesh(devices: Devices) -> Optional[Mesh]:
    """The mesh that ``devices=`` names, or None for ``devices=None`` (no placement: JAX's default device).

    Args:
        devices: None; an int n (the first n of ``jax.devices()``); a sequence of ``jax.Device``; or a
            ``jax.sharding.Mesh`` with an axis named ``"trial"`` (trials are split over that axis only,
            replicated over any other).

    Raises:
        ValueError: naming ``devices`` and what it accepts.
    """
    if devices is None:
        return None
    if isinstance(devices, Mesh):
        if TRIAL_AXIS not in devices.axis_names:
            raise ValueError(f"devices: a Mesh needs an axis named {TRIAL_AXIS!r} to split trials over, got axes {devices.axis_names}")
        return devices
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        available = jax.devices()
        if not 1 <= devices <= len(available):
            raise ValueError(
                f"devices: expected 1 to {len(available)} (the devices JAX sees: {len(available)}), got {devices}; on a CPU set "
                "XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts"
            )
        return Mesh(np.array(available[:devices]), (TRIAL_AXIS,))
    if isinstance(devices, (list, tuple)) and devices and all(isinstance(d, jax.Device) for d in devices):
        if len(set(devices)) != len(devices):
            raise ValueError(f"devices: the same device is listed twice in {list(devices)}")
        return Mesh(np.array(list(devices)), (TRIAL_AXIS,))
    raise ValueError(f"devices: expected None, a number of devices, a list of jax.Device or a jax.sharding.Mesh, got {devices!r}")


def num_shards(mesh: Mesh) -> int:
    """How many pieces the trial axis is split into (the size of the mesh's ``"trial"`` axis)."""
    return int(mesh.shape[TRIAL_AXIS])


def pad_trials(data: SequenceData, multiple: int) -> SequenceData:
    """``data`` (host arrays) with dummy trials appended up to a multiple of ``multiple`` trials.

    Dummy trials: ``y = 0``, ``mask = False``, ``length = 0``, ``inputs = 0`` (the module docstring says
    why they contribute nothing). Shapes (N, T, D) -> (N_pad, T, D), N_pad = ceil(N / multiple) multiple.
    """
    n = data.num_trials
    extra = -n % multiple
    if extra == 0:
        return data

    def pad(x, value):
        x = np.asarray(x)
        return np.concatenate([x, np.full((extra,) + x.shape[1:], value, x.dtype)])

    inputs = None if data.inputs is None else pad(data.inputs, 0)
    return SequenceData(pad(data.y, 0), pad(data.mask, False), pad(data.lengths, 0), inputs)


def trial_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over ``"trial"``, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(TRIAL_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _place(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    # from a full host copy, each process fills only its addressable shards (works multi-host too)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def shard_trials(data: SequenceData, mesh: Mesh, float_dtype=None) -> SequenceData:
    """Pad ``data`` (host arrays) to a multiple of the mesh's trial axis and place it trial-sharded.

    Returns a SequenceData of jax.Arrays with ``NamedSharding(mesh, P("trial"))``: y (N_pad, T, D) in
    ``float_dtype`` (default: JAX's default float), mask bool, lengths int32, inputs float or None.
    """
    float_dtype = jnp.result_type(float) if float_dtype is None else float_dtype
    padded = pad_trials(data, num_shards(mesh))
    s = trial_sharding(mesh)
    inputs = None if padded.inputs is None else _place(np.asarray(padded.inputs, float_dtype), s)
    return SequenceData(
        _place(np.asarray(padded.y, float_dtype), s),
        _place(np.asarray(padded.mask, bool), s),
        _place(np.asarray(padded.lengths, np.int32), s),
        inputs,
    )


def em_trial_arrays(data: SequenceData, mesh: Optional[Mesh], dtype, input_dim: int) -> dict[str, jax.Array]:
    """The arrays a switching EM iterates on, trials padded to a multiple of the devices and sharded over
    ``mesh`` (as they are without one): ``y`` (B, T, N) and ``inputs`` (B, T, U; (B, T, 0) without inputs) in
    ``dtype``, ``mask`` (B, T, N) and ``time_mask`` (B, T), all False on a padding trial."""
    placed = data if mesh is None else shard_trials(data, mesh, dtype)
    y = jnp.asarray(placed.y, dtype)
    return dict(
        y=y, mask=jnp.asarray(placed.mask), time_mask=jnp.arange(y.shape[1]) < jnp.asarray(placed.lengths)[:, None],
        inputs=jnp.asarray(placed.inputs, dtype) if input_dim else jnp.zeros(y.shape[:2] + (0,), dtype),
    )


def shard_per_trial(tree: Any, mesh: Mesh) -> Any:
    """Every array leaf of ``tree`` (per-trial state: leading axis the N real trials, e.g. an EM's q(z)
    marginals or q(x) means) padded like :func:`shard_trials` and placed trial-sharded.

    A padding trial gets a copy of trial 0's values: finite and in range (probabilities, bound
    parameters), and irrelevant, since every statistic and objective term of a length-0 trial is masked.
    """
    multiple = num_shards(mesh)
    s = trial_sharding(mesh)

    def place(x):
        x = np.asarray(x)
        extra = -x.shape[0] % multiple
        if extra:
            x = np.concatenate([x, np.repeat(x[:1], extra, 0)])
        return _place(x, s)

    return jax.tree.map(place, tree)


def unpad_trials(tree: Any, num_trials: int) -> Any:
    """Every array leaf of ``tree`` (leading axis: padded trials) cut back to the first ``num_trials``,
    as host numpy arrays (gathered from the devices)."""
    return jax.tree.map(lambda a: np.asarray(a)[:num_trials], tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array leaf of ``tree`` placed whole on every device of ``mesh`` (None leaves kept)."""
    return jax.device_put(tree, replicated(mesh))


def per_trial_latent_sites(program, data: SequenceData) -> list[str]:
    """Latent (unobserved) sample sites of ``program(data)`` inside its ``"trial"`` plate, found by an
    abstract trace (nothing computed). Their guide parameters are sized by the trial count, so padding
    trials would change them: SVI with ``devices=`` refuses such models for now."""
    from numpyro.handlers import seed, trace

    found: list[str] = []

    def run(d):
        tr = trace(seed(program, jax.random.PRNGKey(0))).get_trace(d)
        for name, site in tr.items():
            if site["type"] == "sample" and not site.get("is_observed", False):
                if any(f.name == TRIAL_AXIS for f in site.get("cond_indep_stack", [])):
                    found.append(name)
        return 0

    jax.eval_shape(run, data)
    return found


def real_trials(lengths) -> jax.Array:
    """(N,) bool, True for real trials: padding trials are the only ones of length 0."""
    return jnp.asarray(lengths) > 0


class _MaskTrials(Messenger):
    """Masks the log density of every sample site inside the ``"trial"`` plate with ``real`` (N,)."""

    def __init__(self, fn, real):
        self.real = real
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != "sample":
            return
        for frame in msg["cond_indep_stack"]:
            if frame.name == TRIAL_AXIS:
                # the plate's dim counts from the right of the batch shape
                m = jnp.reshape(self.real, self.real.shape + (1,) * (-frame.dim - 1))
                msg["fn"] = msg["fn"].mask(m)
                return


def mask_padded_trials(program):
    """``program(data, **kw)`` with every site in its ``"trial"`` plate masked to the real trials
    (``data.lengths > 0``): a padding trial adds exactly 0 to the log density and its gradient."""

    def masked(data: SequenceData, *args, **kwargs):
        with _MaskTrials(None, real_trials(data.lengths)):
            return program(data, *args, **kwargs)

    masked.__name__ = getattr(program, "__name__", "program")
    return masked


def unsupported(runner: str, what: str) -> ValueError:
    """The one-line error of a runner that does not shard ``what`` yet."""
    return ValueError(
        f"devices: {runner} does not shard {what} over devices yet; devices= works with fit_em for HMM, ARHMM, LDS, SLDS and rSLDS, "
        "with fit_svi for models without per-trial latent sites, and with fit_nuts as one chain per device; use devices=None"
    )


__all__ = [
    "TRIAL_AXIS",
    "mask_padded_trials",
    "num_shards",
    "pad_trials",
    "per_trial_latent_sites",
    "real_trials",
    "replicate",
    "resolve_mesh",
    "shard_per_trial",
    "shard_trials",
    "unpad_trials",
    "unsupported",
]
