"""The sweep's search space: :class:`~hypersort_ray.config.SweepConfig` → Ray Tune, and back.

A space key is any dotted key of the experiment config (``model.hypernet.latent_dim``,
``training.l1_weight``, ``preprocessing.augment.flip_prob`` ...). Each sampled trial config is the sweep's
base config with the sampled values written at those keys, then validated as a whole, so a value the
experiment config would reject (``latent_dim: 0``, an ROI not divisible by ``2**n_down``) is refused
before Ray starts, with the key path in the message.

Search modes:

* ``random`` — Tune's ``BasicVariantGenerator``: ``num_samples`` draws; ``grid`` dimensions are
  crossed in full for each draw (Tune's semantics), so the trial count is
  ``num_samples × product(grid sizes)``.
* ``grid`` — every ``choice`` dimension is crossed like a ``grid`` one; continuous dimensions are still
  drawn at random, once per grid point and per ``num_samples`` repeat.
* ``optuna`` — TPE through ``ray.tune.search.optuna.OptunaSearch`` when Optuna is installed (it is not
  part of the default install); ``grid`` dimensions are refused there.

Example:
    >>> cfg = SweepConfig()
    >>> sorted(build_param_space(cfg))
    ['model.hypernet.latent_dim', 'training.l1_weight', 'training.lr']
    >>> trial_experiment(cfg, {"model.hypernet.latent_dim": 4}).model.hypernet.latent_dim
    4
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from hypersort_ray.config import ExperimentConfig, SearchDim, SweepConfig, format_validation_error, set_dotted
from hypersort_ray.errors import ConfigError

__all__ = [
    "apply_sample",
    "build_param_space",
    "grid_size",
    "split_validation",
    "trial_experiment",
    "validate_space",
]


def _tune_domain(key: str, dim: SearchDim, search: str) -> Any:
    from ray import tune

    if dim.type == "grid" or (dim.type == "choice" and search == "grid"):
        return tune.grid_search(list(dim.values or []))
    if dim.type == "choice":
        return tune.choice(list(dim.values or []))
    low, high = float(dim.low), float(dim.high)  # type: ignore[arg-type]
    if dim.type == "uniform":
        return tune.uniform(low, high)
    if dim.type == "loguniform":
        return tune.loguniform(low, high)
    if dim.type == "randint":
        lo, hi = math.ceil(low), math.floor(high)
        if lo > hi:
            raise ConfigError(f"space.{key}: randint [{dim.low}, {dim.high}] contains no integer")
        return tune.randint(lo, hi + 1)  # Tune's upper bound is exclusive; ours is inclusive
    raise ConfigError(f"space.{key}: unknown type {dim.type!r}")  # pragma: no cover - pydantic guards it


def build_param_space(cfg: SweepConfig) -> dict[str, Any]:
    """The Tune ``param_space``: one flat entry per dotted key (Tune keeps dots in flat keys).

    Raises:
        ConfigError: a dimension that cannot be mapped (see :func:`validate_space`).
    """
    validate_space(cfg)
    return {key: _tune_domain(key, dim, cfg.search) for key, dim in cfg.space.items()}


def grid_size(cfg: SweepConfig) -> int:
    """Trials per ``num_samples`` draw: the product of the crossed dimensions' sizes."""
    n = 1
    for dim in cfg.space.values():
        if dim.type == "grid" or (dim.type == "choice" and cfg.search == "grid"):
            n *= len(dim.values or [])
    return n


def apply_sample(base: Mapping[str, Any], sample: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` (a ``model_dump`` dict) with ``sample``'s dotted keys written in."""
    import copy

    data = copy.deepcopy(dict(base))
    for key, value in sample.items():
        set_dotted(data, key, value)
    return data


def _resources_applied(cfg: SweepConfig) -> dict[str, Any]:
    """The base config with the sweep's per-trial resources written into ``training.scaling``."""
    data = cfg.base.model_dump(mode="json")
    scaling = data["training"]["scaling"]
    scaling["num_workers"] = cfg.workers_per_trial
    scaling["cpus_per_worker"] = cfg.cpus_per_worker
    scaling["gpus_per_worker"] = cfg.gpus_per_worker
    scaling["use_gpu"] = cfg.gpus_per_worker > 0
    return data


def trial_experiment(cfg: SweepConfig, sample: Mapping[str, Any]) -> ExperimentConfig:
    """The experiment config of one trial: base + per-trial resources + sampled values, validated.

    Sampled values win over the sweep's resource fields (a space may sweep
    ``training.scaling.num_workers``).

    Raises:
        ConfigError: the combination is not a valid experiment config (message names the key).
    """
    unknown = [k for k in sample if k not in cfg.space]
    if unknown:
        raise ConfigError(f"sampled keys {unknown} are not in the sweep space {sorted(cfg.space)}")
    data = apply_sample(_resources_applied(cfg), sample)
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        shown = ", ".join(f"{k}={v!r}" for k, v in sample.items())
        raise ConfigError(format_validation_error(err, f"sweep trial ({shown})")) from None


def _probe_values(dim: SearchDim) -> list[Any]:
    """Values that stand for the whole dimension when checking it against the experiment config."""
    if dim.type in ("choice", "grid"):
        return list(dim.values or [])
    if dim.type == "randint":
        return [math.ceil(float(dim.low)), math.floor(float(dim.high))]  # type: ignore[arg-type]
    return [float(dim.low), float(dim.high)]  # type: ignore[arg-type]


def validate_space(cfg: SweepConfig) -> None:
    """Check the search space before anything starts.

    Every value of a ``choice``/``grid`` dimension and both ends of a range must give a valid experiment
    config on their own (other keys at their base values); the search mode must be usable.

    Raises:
        ConfigError: naming ``space.<key>`` and the offending value.
    """
    if not cfg.space:
        raise ConfigError("space: empty; give at least one dimension (e.g. model.hypernet.latent_dim)")
    for key, dim in cfg.space.items():
        if dim.type in ("uniform", "loguniform", "randint") and dim.values:
            raise ConfigError(f"space.{key}: {dim.type} takes low/high, not values")
        if dim.type in ("choice", "grid") and (dim.low is not None or dim.high is not None):
            raise ConfigError(f"space.{key}: {dim.type} takes values, not low/high")
        if dim.type == "randint" and math.ceil(float(dim.low)) > math.floor(float(dim.high)):  # type: ignore[arg-type]
            raise ConfigError(f"space.{key}: randint [{dim.low}, {dim.high}] contains no integer")
        for value in _probe_values(dim):
            try:
                trial_experiment(cfg, {key: value})
            except ConfigError as exc:
                raise ConfigError(f"space.{key}: value {value!r} is not usable:\n{exc}") from None
    if cfg.search == "optuna":
        grids = [k for k, d in cfg.space.items() if d.type == "grid"]
        if grids:
            raise ConfigError(f"search: optuna cannot cross grid dimensions {grids}; use choice or search: grid")
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError(
                "search: optuna needs the optuna package, which is not installed; "
                "use search: random or grid, or `pip install optuna`"
            ) from None


# --------------------------------------------------------------------------------- validation split
def split_validation(n_cases: int, fraction: float) -> tuple[list[int], list[int]]:
    """Deterministic train/validation split by datalist index.

    The validation indices are spread evenly over the datalist (index ``i`` is held out when
    ``floor((i + 1) · f) > floor(i · f)``), so a datalist sorted by site or date still gives a
    representative held-out set, and the same datalist and fraction always give the same split.

    Returns:
        ``(train_indices, validation_indices)``; validation is empty when ``fraction`` is 0.

    Raises:
        ConfigError: a fraction that leaves no training case, or holds out none while asked to.
    """
    if fraction <= 0:
        return list(range(n_cases)), []
    val = [i for i in range(n_cases) if math.floor((i + 1) * fraction + 1e-9) > math.floor(i * fraction + 1e-9)]
    if not val:
        raise ConfigError(
            f"data.validation_fraction = {fraction} holds out no case of {n_cases}; use at least {1 / n_cases:.3g}"
        )
    train = [i for i in range(n_cases) if i not in set(val)]
    if not train:
        raise ConfigError(f"data.validation_fraction = {fraction} leaves no training case of {n_cases}")
    return train, val

