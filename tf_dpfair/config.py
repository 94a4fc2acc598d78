"""DPConfig: the validated, frozen settings of DP training."""

import dataclasses
import math
import numbers
import secrets

CLIPPING_MODES = ("auto", "vectorized", "ghost")
# Thresholds that follow a noisy count of the per-example gradient norms.
QUANTILE, GLOBAL_ADAPT = "quantile", "global_adapt"
ADAPTIVE_CLIPPING = (QUANTILE, GLOBAL_ADAPT)
DEFAULT_TARGET_QUANTILE = {QUANTILE: 0.5, GLOBAL_ADAPT: 0.9}


# repr=False: the class writes its own `__repr__`, which hides the seed (a
# generated one would print it, and so would `str`, f-strings and logs).
@dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
class DPConfig:
    """Settings of one DP-SGD training run.

    Numbers may be Python or numpy scalars; they are stored as Python
    `float` / `int` (an integer field also takes a float that is a whole
    number, such as 256.0). Bools, NaN and infinities are refused.

    Attributes:
      l2_norm_clip: C, the bound on each example's gradient L2 norm (global over
        all trainable variables). > 0.
      noise_multiplier: sigma; each update adds N(0, (sigma * C)^2) noise to
        the sum of clipped gradients, once for the whole job. >= 0; 0 gives no
        privacy (useful for tests and clipped-only baselines). With
        `adaptive_clipping`, sigma is the noise of the whole update as the
        accountant sees it (the clipped sum and the noisy count together),
        and the sum itself gets `gradient_noise_multiplier` (see there), so
        a sigma calibrated to a target epsilon keeps that epsilon.
      expected_batch_size: the logical batch size the noised sum is divided by.
        Under Poisson sampling the expected (not the realised) size. > 0.
      microbatch_size: examples per vectorized per-example gradient pass, per
        replica. Memory grows with it, not with the logical batch. > 0.
      augmult: views per example (augmentation multiplicity K). With K > 1 the
        inputs are `[B, K, ...]` and an example's loss is the mean over its K
        views, so clipping stays per example. >= 1.
      ema_decay: decay of the exponential moving average of the trainable
        weights (the paper uses 0.9999), or None for no EMA. In [0, 1).
      ema_warmup: the warm-up horizon h of the EMA: update t (t updates
        before it) uses the decay min(ema_decay, (1 + t) / (h + t)). None or 0
        turns the warm-up off (the decay is `ema_decay` from the first
        update; 0 is stored as None). Otherwise a finite number >= 1; the
        default 10 holds the decay well below `ema_decay` for long: 0.69
        after 20 updates, 0.96 after 200, whatever `ema_decay` says (see
        `tf_dpfair.training.ema.effective_decay`). Configs saved without it
        load with 10. Ignored when `ema_decay` is None.
      clipping: how per-example clipped gradients are computed: "vectorized"
        (every example differentiated through the whole model with
        `tf.vectorized_map`), "ghost" (per-example norms and the clipped sum
        layer by layer from activations and output gradients; functional
        models only, see `tf_dpfair.dpsgd.ghost`) or "auto" (ghost where the model
        allows, else vectorized with a one-line notice; ghost is the faster
        in benchmarks/dp_overhead.py). All give the same sum.
      adaptive_clipping: None (a fixed clip norm C), "quantile" or
        "global_adapt"; both follow a threshold T_t that each update adapts
        from a noisy count of the examples whose gradient norm is at most
        T_t (`tf_dpfair.dpsgd.adaptive`):
        "quantile" (Andrew et al. 2021, adaptive clipping): the clip norm
        itself is T_t, each gradient scaled by min(1, T_t / ||g||) and the
        noise N(0, (sigma_g * T_t)^2);
        "global_adapt" (DPSGD-Global-Adapt, Esipova et al. 2023): the clip
        norm stays C and each gradient is scaled by C / max(||g||, T_t):
        below T_t all keep their direction and relative size (times
        C / T_t), above it they are clipped to C; the noise is
        N(0, (sigma_g * C)^2). Either way one example moves the sum by at
        most the clip norm.
      count_noise_multiplier: sigma_b, the stddev of the Gaussian noise on
        the count (sensitivity 1; Andrew et al. suggest about
        expected_batch_size / 20). Required with `adaptive_clipping`, and
        > noise_multiplier: the count takes its share of the update's noise
        budget, 1 / sigma^2 = 1 / sigma_g^2 + 1 / sigma_b^2.
      target_quantile: gamma in (0, 1), the share of examples whose norm
        should be at most T_t. Default 0.5 for "quantile" (the median, as
        Andrew et al.) and 0.9 for "global_adapt".
      threshold_learning_rate: eta > 0 of the geometric update
        T_{t+1} = T_t * exp(-eta * (b_t - gamma)), b_t the noisy share.
        Default 0.2 (Andrew et al.).
      initial_threshold: T_0 > 0; default `l2_norm_clip`.
      seed: the secret seed of the noise stream. None (the default) draws a
        fresh secret seed. An explicit seed makes noise reproducible, so it is
        for tests only: anyone who knows it can subtract the noise. It is
        never saved with the model, and `repr`/`str` show `seed=<secret>`
        (read `config.seed` where the value is really needed).
    """

    l2_norm_clip: float
    noise_multiplier: float
    expected_batch_size: int
    microbatch_size: int = 32
    augmult: int = 1
    ema_decay: float | None = None
    ema_warmup: float | None = 10.0
    clipping: str = "auto"
    adaptive_clipping: str | None = None
    count_noise_multiplier: float | None = None
    target_quantile: float | None = None
    threshold_learning_rate: float | None = None
    initial_threshold: float | None = None
    # Out of the repr and the hash: `hash(int)` is the int modulo 2**61 - 1
    # and a tuple's hash can be unwound, so hashing the seed would leak it.
    seed: int | None = dataclasses.field(default=None, repr=False, hash=False)

    def __post_init__(self):
        # Numpy scalars (np.int64(8), np.float32(1.0)) are converted to Python
        # numbers, so the frozen config holds plain values that serialize.
        self._set("l2_norm_clip", _real("l2_norm_clip", self.l2_norm_clip,
                                        "a finite number > 0"))
        _require(self.l2_norm_clip > 0,
                 f"l2_norm_clip must be a finite number > 0, got "
                 f"{self.l2_norm_clip!r}.")
        self._set("noise_multiplier", _real(
            "noise_multiplier", self.noise_multiplier, "a finite number >= 0"))
        _require(self.noise_multiplier >= 0,
                 f"noise_multiplier must be a finite number >= 0, got "
                 f"{self.noise_multiplier!r}.")
        for name in ("expected_batch_size", "microbatch_size", "augmult"):
            value = _integer(name, getattr(self, name), "an integer >= 1")
            _require(value >= 1, f"{name} must be an integer >= 1, got "
                                 f"{value!r}.")
            self._set(name, value)
        if self.ema_decay is not None:
            self._set("ema_decay", _real("ema_decay", self.ema_decay,
                                         "in [0, 1) or None"))
            _require(0 <= self.ema_decay < 1,
                     f"ema_decay must be in [0, 1) or None, got "
                     f"{self.ema_decay!r}.")
        if self.ema_warmup is not None:
            wanted = "None, 0 (no warm-up) or a finite number >= 1"
            self._set("ema_warmup", _real("ema_warmup", self.ema_warmup, wanted))
            _require(self.ema_warmup == 0 or self.ema_warmup >= 1,
                     f"ema_warmup must be {wanted}, got {self.ema_warmup!r}.")
            if self.ema_warmup == 0:
                self._set("ema_warmup", None)
        _require(self.clipping in CLIPPING_MODES,
                 f"clipping must be one of {CLIPPING_MODES}, got "
                 f"{self.clipping!r}.")
        self._check_adaptive()
        if self.seed is None:
            self._set("seed", secrets.randbits(62))
        else:
            self._set("seed", _seed(self.seed))

    def __repr__(self):
        # The adaptive threshold's fields only where it is on.
        off = _ADAPTIVE_FIELDS if self.adaptive_clipping is None else ()
        fields = ", ".join(
            f"{field.name}={getattr(self, field.name)!r}"
            for field in dataclasses.fields(self) if field.repr and field.name not in off)
        return f"{type(self).__name__}({fields}, seed=<secret>)"

    def _set(self, name, value):
        object.__setattr__(self, name, value)

    def _check_adaptive(self):
        names = ("count_noise_multiplier", "target_quantile", "threshold_learning_rate",
                 "initial_threshold")
        if self.adaptive_clipping is None:
            given = [n for n in names if getattr(self, n) is not None]
            _require(not given, f"{', '.join(given)} set the adaptive threshold; they need "
                                f"adaptive_clipping (one of {ADAPTIVE_CLIPPING}).")
            return
        _require(self.adaptive_clipping in ADAPTIVE_CLIPPING,
                 f"adaptive_clipping must be None or one of {ADAPTIVE_CLIPPING}, got "
                 f"{self.adaptive_clipping!r}.")
        _require(self.count_noise_multiplier is not None,
                 "adaptive_clipping needs count_noise_multiplier > noise_multiplier: the "
                 "count that adapts the threshold is released only with noise.")
        sigma_b = _real("count_noise_multiplier", self.count_noise_multiplier,
                        "a finite number > noise_multiplier")
        _require(sigma_b > 0 and sigma_b > self.noise_multiplier,
                 f"count_noise_multiplier must be > 0 and > noise_multiplier "
                 f"({self.noise_multiplier!r}), since 1 / sigma^2 = 1 / sigma_g^2 + "
                 f"1 / sigma_b^2 leaves the gradient no noise otherwise; got {sigma_b!r}.")
        self._set("count_noise_multiplier", sigma_b)
        quantile = (DEFAULT_TARGET_QUANTILE[self.adaptive_clipping]
                    if self.target_quantile is None else
                    _real("target_quantile", self.target_quantile, "in (0, 1)"))
        _require(0 < quantile < 1, f"target_quantile must be in (0, 1), got {quantile!r}.")
        self._set("target_quantile", quantile)
        for name, default in (("threshold_learning_rate", 0.2),
                              ("initial_threshold", self.l2_norm_clip)):
            value = default if getattr(self, name) is None else _real(
                name, getattr(self, name), "a finite number > 0")
            _require(value > 0, f"{name} must be a finite number > 0, got {value!r}.")
            self._set(name, value)

    @property
    def gradient_noise_multiplier(self):
        """sigma_g: the noise on the clipped sum, in units of the clip norm.

        `noise_multiplier` without adaptive clipping; with it,
        (sigma^-2 - sigma_b^-2)^(-1/2), so that the sum and the count
        together are one Gaussian mechanism of multiplier sigma.
        """
        sigma = self.noise_multiplier
        if self.adaptive_clipping is None or sigma == 0:
            return sigma
        return (sigma ** -2 - self.count_noise_multiplier ** -2) ** -0.5

    @property
    def noise_stddev(self):
        """Stddev of the noise added to the sum of clipped gradients.

        With adaptive_clipping="quantile" the clip norm is the threshold of
        each update, and the stddev `gradient_noise_multiplier` times it.
        """
        return self.gradient_noise_multiplier * self.l2_norm_clip

    def get_config(self):
        """Returns a dict for serialization; the secret seed is left out."""
        config = dataclasses.asdict(self)
        config["seed"] = None
        return config

    @classmethod
    def from_config(cls, config):
        """Builds a DPConfig from `get_config()` output (a fresh seed is drawn)."""
        return cls(**config)


_ADAPTIVE_FIELDS = ("adaptive_clipping", "count_noise_multiplier", "target_quantile",
                   "threshold_learning_rate", "initial_threshold")


def _is_bool(value):
    # numpy's bool is neither a Python bool nor a number.
    return isinstance(value, bool) or type(value).__name__ in ("bool", "bool_")


def _real(name, value, wanted):
    """`value` as a finite Python float.

    Raises:
      ValueError: `value` is a bool, not a real number, NaN or infinite.
    """
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {wanted}, got {value!r} "
                         f"({type(value).__name__}).")
    value = float(value)
    _require(math.isfinite(value), f"{name} must be {wanted}, got {value!r}.")
    return value


def _integer(name, value, wanted):
    """`value` as a Python int; a float must be a whole number.

    Raises:
      ValueError: `value` is a bool, not a number, NaN, infinite or a float
        with a fractional part.
    """
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {wanted}, got {value!r} "
                         f"({type(value).__name__}).")
    if isinstance(value, numbers.Integral):
        return int(value)
    value = float(value)
    _require(math.isfinite(value) and value.is_integer(),
             f"{name} must be {wanted}; got {value!r}, which is not a whole "
             f"number.")
    return int(value)


def _seed(value):
    """`value` as a Python int in [0, 2**62).

    The message of a refusal names the value's type, never the value: a
    refused seed is often a secret one slightly off (a 64-bit draw, say).

    Raises:
      ValueError: `value` is a bool, not a whole number, or out of range.
    """
    wanted = "seed must be None or an integer in [0, 2**62)"
    hidden = "(the value is not shown: a seed is secret)"
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise ValueError(f"{wanted}; got a {type(value).__name__} {hidden}.")
    if not isinstance(value, numbers.Integral):
        value = float(value)
        _require(math.isfinite(value) and value.is_integer(),
                 f"{wanted}; got a number that is not whole {hidden}.")
    value = int(value)
    _require(0 <= value < 2**62, f"{wanted}; got an integer outside that range "
                                 f"{hidden}.")
    return value


def _require(condition, message):
    if not condition:
        raise ValueError(message)
