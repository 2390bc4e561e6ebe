"""Gaussian diffusion as MAR uses it (guided-diffusion / DiT ``diffusion/`` package).

Cosine betas over 1000 steps, epsilon prediction with learned-range variance, loss =
MSE(eps) + VLB (bits). ``prediction="v"`` (or ``"x0"``) makes the network predict
``v = sqrt(a) eps - sqrt(1-a) x0`` (or ``x0``) instead: the same sampler and VLB, with the
MSE on that target. Sampling runs on a respaced process (``space_timesteps``) while
the network always sees original-scale timesteps (``timestep_map``). Tables are built in
float64 numpy and read as float32, as the reference does.

Every sampling step is Gaussian, ``x_{t-1} ~ N(mu_theta, sigma_t^2 tau^2)``, so the
sampler records exact per-step log-probabilities (what the decoder GRPO needs) and
:func:`trajectory_log_probs` recomputes them under other parameters.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from unimm.models import diffusion_head

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t [N, D], original t [N] or []) -> [N, 2D]

# ----------------------------------------------------------------------------- schedule


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
                     for i in range(num_timesteps)], np.float64)


def named_betas(name: str, num_timesteps: int) -> np.ndarray:
    if name == "cosine":
        return cosine_betas(num_timesteps)
    if name == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    raise ValueError(f"unknown noise schedule {name!r}; expected 'cosine' or 'linear'")


def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> set[int]:
    """guided-diffusion's respacing: ``"100"`` keeps 100 evenly strided steps; ``"10,20"``
    strides each half separately; ``"ddimN"`` uses an integer stride."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {want} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))  # accumulated float + round, exactly as the reference
            cur += stride
        start += size
    return set(steps)


class Schedule(NamedTuple):
    """float64 tables of a (respaced) process, indexed by its own step ``t``."""
    timestep_map: np.ndarray            # int32: step -> original timestep the network sees
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    log_betas: np.ndarray

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)


@functools.lru_cache(maxsize=16)
def make_schedule(num_timesteps: int = 1000, respacing: str = "", noise_schedule: str = "cosine") -> Schedule:
    """``create_diffusion(respacing, noise_schedule)``: "" keeps every step (MAR's training
    process, which also goes through the respacing arithmetic)."""
    base = np.cumprod(1.0 - named_betas(noise_schedule, num_timesteps))
    keep = space_timesteps(num_timesteps, respacing or [num_timesteps])
    tmap, betas, last = [], [], 1.0
    for i, acp in enumerate(base):
        if i in keep:
            betas.append(1 - acp / last)
            last = acp
            tmap.append(i)
    betas = np.array(betas, np.float64)
    acp = np.cumprod(1.0 - betas)
    acp_prev = np.append(1.0, acp[:-1])
    post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
    # The posterior variance is 0 at t=0: its log is clipped to the next step's value.
    post_log_var = np.log(np.append(post_var[1], post_var[1:])) if len(betas) > 1 else np.array([])
    return Schedule(
        timestep_map=np.array(tmap, np.int32), betas=betas, alphas_cumprod=acp,
        sqrt_alphas_cumprod=np.sqrt(acp), sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - acp),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / acp), sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / acp - 1),
        posterior_log_variance_clipped=post_log_var,
        posterior_mean_coef1=betas * np.sqrt(acp_prev) / (1.0 - acp),
        posterior_mean_coef2=(1.0 - acp_prev) * np.sqrt(1.0 - betas) / (1.0 - acp),
        log_betas=np.log(betas))


def _at(table: np.ndarray, t: jax.Array) -> jax.Array:
    """``table[t]`` as float32 ``[N, 1]`` (float64 table, float32 compute, as the reference)."""
    return jnp.asarray(table.astype(np.float32))[t][:, None]


# ----------------------------------------------------------------------- gaussian maths


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-probability (nats) of the 1/255-wide bin around ``x`` (data assumed in [-1, 1])."""
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def q_sample(s: Schedule, x0, t, noise):
    return _at(s.sqrt_alphas_cumprod, t) * x0 + _at(s.sqrt_one_minus_alphas_cumprod, t) * noise


def q_posterior(s: Schedule, x0, x_t, t):
    """Mean and clipped log-variance of ``q(x_{t-1} | x_t, x_0)``."""
    mean = _at(s.posterior_mean_coef1, t) * x0 + _at(s.posterior_mean_coef2, t) * x_t
    return mean, _at(s.posterior_log_variance_clipped, t) * jnp.ones_like(x_t)


PREDICTIONS = ("epsilon", "v", "x0")


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"model.diffusion.prediction={prediction!r}; expected one of {PREDICTIONS}")
    return prediction


def predicted_x0(s: Schedule, out: jax.Array, x: jax.Array, t: jax.Array, prediction: str) -> jax.Array:
    """x0 implied by the network's mean channels ``out`` at ``x_t``."""
    if prediction == "x0":
        return out
    if prediction == "v":   # x0 = sqrt(a) x_t - sqrt(1-a) v
        return _at(s.sqrt_alphas_cumprod, t) * x - _at(s.sqrt_one_minus_alphas_cumprod, t) * out
    return _at(s.sqrt_recip_alphas_cumprod, t) * x - _at(s.sqrt_recipm1_alphas_cumprod, t) * out


def training_target(s: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array, prediction: str) -> jax.Array:
    if prediction == "x0":
        return x0
    if prediction == "v":
        return _at(s.sqrt_alphas_cumprod, t) * noise - _at(s.sqrt_one_minus_alphas_cumprod, t) * x0
    return noise


def p_mean_variance(s: Schedule, model_output: jax.Array, x: jax.Array, t: jax.Array,
                    clip: float = 0.0, prediction: str = "epsilon", clip_var: bool = False) -> dict:
    """``p(x_{t-1} | x_t)`` from the network output ``[N, 2D]`` = (eps / v / x0 per
    ``prediction``, variance value in [-1, 1]).

    ``clip > 0`` clamps the predicted x0 to ``[-clip, clip]`` (guided-diffusion's
    ``clip_denoised``): at the noisiest steps x0 = (x_t - sqrt(1-a) eps) / sqrt(a) multiplies
    the eps error by ~2e4, which a head short of training cannot keep small.

    ``clip_var`` keeps the variance value in [-1, 1], i.e. the log-variance between the
    posterior's and log beta_t, the ends of the learned range. Unclipped (guided-diffusion),
    a head whose x0 is off by more than beta_t at the last steps learns values of 20-40
    there, and the step noise, exp(20 x (log beta - log posterior)), destroys the sample."""
    eps, var_values = jnp.split(model_output, 2, axis=-1)
    if clip_var:
        var_values = jnp.clip(var_values, -1.0, 1.0)
    min_log = _at(s.posterior_log_variance_clipped, t)
    max_log = _at(s.log_betas, t)
    frac = (var_values + 1) / 2
    log_var = frac * max_log + (1 - frac) * min_log
    pred_xstart = predicted_x0(s, eps, x, t, prediction)
    if clip:
        pred_xstart = jnp.clip(pred_xstart, -clip, clip)
    mean, _ = q_posterior(s, pred_xstart, x, t)
    return {"mean": mean, "variance": jnp.exp(log_var), "log_variance": log_var, "pred_xstart": pred_xstart}


# ------------------------------------------------------------------------------ training


def training_loss(eps_fn: ModelFn, x0: jax.Array, t: jax.Array, noise: jax.Array,
                  sched: Schedule | None = None, prediction: str = "epsilon") -> jax.Array:
    """Per-example ``mean(MSE(eps)) + VLB`` (bits); the VLB sees a stop-gradient eps so it
    trains only the variance, and is the decoder NLL at ``t == 0``, a KL elsewhere.

    ``prediction`` "v" / "x0" regress that target instead of eps. In x0 terms the eps MSE
    weighs errors by the SNR, v by 1 + SNR: at high noise, where a token's content is
    decided and only the condition can say what it is, eps pays almost nothing for
    ignoring the condition and v pays the full x0 error."""
    s = make_schedule() if sched is None else sched
    x_t = q_sample(s, x0, t, noise)
    out = eps_fn(x_t, jnp.asarray(s.timestep_map)[t])
    eps, var_values = jnp.split(out, 2, axis=-1)
    frozen = jnp.concatenate([jax.lax.stop_gradient(eps), var_values], axis=-1)
    p = p_mean_variance(s, frozen, x_t, t, prediction=prediction)
    true_mean, true_log_var = q_posterior(s, x0, x_t, t)
    kl = jnp.mean(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"]), -1) / math.log(2.0)
    nll = -jnp.mean(discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"]), -1)
    vb = jnp.where(t == 0, nll / math.log(2.0), kl)
    return jnp.mean((training_target(s, x0, t, noise, prediction) - eps) ** 2, -1) + vb


def diffusion_loss(head_params: Any, head_cfg: Any, diff_cfg: Any, target: jax.Array, z: jax.Array,
                   mask: jax.Array, rng: jax.Array, *, row_sizes: tuple[int, ...] = ()) -> jax.Array:
    """MAR's DiffLoss: every token repeated ``batch_mul`` times with its own t and noise;
    the mean over masked tokens (``mask [N]``: 1 = counts, or per-token weights for a
    weighted mean).

    ``row_sizes`` (static, ascending, the last one the tokens of an example): the rows are
    examples of that many tokens each, and the head runs only on the tokens of nonzero weight,
    gathered per example into the smallest size that holds every example's count (one
    ``lax.switch`` branch per size). The loss and its gradients are the same to float rounding
    (every row keeps its own t and noise); MAR computes every token and multiplies the
    unmasked ones by 0.
    """
    mul = diff_cfg.batch_mul
    n, dim = target.shape
    s = make_schedule(diff_cfg.num_timesteps, "", diff_cfg.noise_schedule)
    k_t, k_noise = jax.random.split(rng)
    t = jax.random.randint(k_t, (mul * n,), 0, s.num_timesteps)
    noise = jax.random.normal(k_noise, (mul * n, dim), jnp.float32)
    weights = mask.astype(jnp.float32)

    def loss_over(p, zz, tg, rows):
        parts = [(tg, 1), (zz, 1), (weights, 1), (t, mul), (noise, mul)]
        tg, zz, w, tt, eps = (a if rows is None else _take_tokens(a, lead, rows) for a, lead in parts)
        fn = diffusion_head.conditioned(p, head_cfg, zz, tile=mul, time_table=s.num_timesteps, joined=False)
        loss = training_loss(fn, jnp.tile(tg, (mul, 1)).astype(jnp.float32), tt, eps, s, _prediction(diff_cfg))
        w = jnp.tile(w, mul)
        return jnp.sum(loss * w) / jnp.maximum(jnp.sum(w), 1.0)

    if len(row_sizes) <= 1:
        return loss_over(head_params, z, target, None)
    tokens = row_sizes[-1]
    kept = (weights != 0).reshape(n // tokens, tokens)
    order = jnp.argsort(~kept, axis=1, stable=True).astype(jnp.int32)   # kept tokens first
    size = jnp.searchsorted(jnp.asarray(row_sizes), jnp.max(jnp.sum(kept, axis=1)))
    size = jnp.minimum(size, len(row_sizes) - 1)
    rows = [order[:, :k] if k < tokens else None for k in row_sizes]

    # The gradient is taken inside the chosen branch: differentiating through lax.switch
    # would make every branch return the residuals of all of them (zero-filled), which cost
    # more than the rows saved.
    @jax.custom_vjp
    def kept_loss(p, zz, tg):
        return jax.lax.switch(size, [functools.partial(loss_over, rows=r) for r in rows], p, zz, tg)

    def fwd(p, zz, tg):
        grad = [jax.value_and_grad(functools.partial(loss_over, rows=r), argnums=(0, 1, 2)) for r in rows]
        return jax.lax.switch(size, grad, p, zz, tg)

    def bwd(grads, g):
        return jax.tree.map(lambda x: g * x, grads)

    kept_loss.defvjp(fwd, bwd)
    return kept_loss(head_params, z, target)


def _take_tokens(a: jax.Array, lead: int, rows: jax.Array) -> jax.Array:
    """``a [lead * B * L, ...]`` -> ``[lead * B * K, ...]``: the tokens ``rows [B, K]`` of every
    example, in each of the ``lead`` repeats."""
    b, k = rows.shape
    a = a.reshape(lead, b, -1, *a.shape[1:])
    idx = rows.reshape(1, b, k, *([1] * (a.ndim - 3)))
    return jnp.take_along_axis(a, idx, axis=2).reshape(lead * b * k, *a.shape[3:])


# ------------------------------------------------------------------------------ sampling


def step_log_prob(mean: jax.Array, log_var: jax.Array, x_next: jax.Array, temperature) -> jax.Array:
    """``log N(x_next; mean, exp(log_var) * temperature^2)`` summed over channels -> ``[N]``.

    A step with temperature 0 is deterministic and scores 0 (as does the noiseless last step).
    """
    tau = jnp.asarray(temperature, jnp.float32)
    log_var = log_var + 2.0 * jnp.log(jnp.maximum(tau, 1e-30))
    lp = -0.5 * ((x_next - mean) ** 2 * jnp.exp(-log_var) + log_var + math.log(2 * math.pi))
    return jnp.where(tau > 0, jnp.sum(lp, -1), 0.0)


def head_model_fn(head_params: Any, head_cfg: Any, z: jax.Array, cfg_scale=1.0,
                  guided: bool = False, timesteps: np.ndarray | None = None) -> ModelFn:
    """The network as the sampler sees it. ``guided``: ``z = [cond; uncond]`` and ``x`` is the
    shared half; eps = uncond + scale * (cond - uncond), variance channels of the cond half.
    ``timesteps``: the schedule's, for the head's table of adaLN outputs
    (:func:`diffusion_head.conditioned`)."""
    head = diffusion_head.conditioned(head_params, head_cfg, z, timesteps=timesteps)

    def fn(x, t):
        if not guided:
            return head(x, t)
        m = x.shape[0]
        out = head(jnp.concatenate([x, x]), t if jnp.ndim(t) == 0 else jnp.concatenate([t, t]))
        d = x.shape[-1]
        eps_c, eps_u = out[:m, :d], out[m:, :d]
        return jnp.concatenate([eps_u + cfg_scale * (eps_c - eps_u), out[:m, d:]], axis=-1)
    return fn


def _prediction(diff_cfg: Any) -> str:
    return check_prediction(diff_cfg.prediction)


def _step_options(diff_cfg: Any) -> dict:
    """How the config turns a network output into a step: x0 clamp, target, variance clip."""
    return dict(clip=diff_cfg.clip_denoised, prediction=_prediction(diff_cfg),
                clip_var=diff_cfg.clip_log_variance)


def _step_mean_logvar(model_fn: ModelFn, s: Schedule, x: jax.Array, i: jax.Array, clip: float = 0.0,
                      prediction: str = "epsilon", clip_var: bool = False):
    t = jnp.full((x.shape[0],), i, jnp.int32)
    # One timestep for every row: the network embeds it once.
    p = p_mean_variance(s, model_fn(x, jnp.asarray(s.timestep_map)[i]), x, t, clip, prediction, clip_var)
    return p["mean"], p["log_variance"]


NoiseFn = Callable[[jax.Array, tuple], jax.Array]


def _draw_step(model_fn: ModelFn, s: Schedule, x: jax.Array, i: jax.Array, eps: jax.Array, temperature,
               clip: float, prediction: str, clip_var: bool):
    """One ancestral step from ``x`` at step ``i`` with standard normal ``eps`` (shaped like
    ``x``): ``(x_next, mean, log_var)``."""
    mean, log_var = _step_mean_logvar(model_fn, s, x, i, clip, prediction, clip_var)
    std = jnp.where(i > 0, jnp.exp(0.5 * log_var) * temperature, 0.0)  # no noise at t = 0
    return mean + std * eps.astype(x.dtype), mean, log_var


def step_noise(noise: NoiseFn, rng: jax.Array, steps: int, shape: tuple) -> jax.Array:
    """Every step's noise ``[steps, *shape]`` in one draw before the steps' loop (one RNG
    program instead of one per step): step ``j`` gets ``noise(split(rng, steps)[j], shape)``,
    the same numbers as drawing inside the loop."""
    return jax.vmap(lambda key: noise(key, shape))(jax.random.split(rng, steps))


def sample_loop(model_fn: ModelFn, s: Schedule, x_T: jax.Array, rng: jax.Array, temperature=1.0,
                clip: float = 0.0, prediction: str = "epsilon", clip_var: bool = False,
                noise: NoiseFn = jax.random.normal):
    """Ancestral sampling from ``x_T`` as one ``lax.scan`` over the steps ``S-1 .. 0``.

    Returns ``(x_0, log_probs [S, N], traj)``; ``traj`` holds per step (first = noisiest)
    ``t``, the input ``x``, the drawn ``x_next``, ``mean`` and ``log_var``. ``noise(key,
    shape)`` draws each step's standard normal noise (default ``jax.random.normal``).
    """
    def step(x, inp):
        i, eps = inp
        x_next, mean, log_var = _draw_step(model_fn, s, x, i, eps, temperature, clip, prediction, clip_var)
        lp = jnp.where(i > 0, step_log_prob(mean, log_var, x_next, temperature), 0.0)
        return x_next, (lp, dict(t=i, x=x, x_next=x_next, mean=mean, log_var=log_var))

    steps = jnp.arange(s.num_timesteps - 1, -1, -1, dtype=jnp.int32)
    eps = step_noise(noise, rng, s.num_timesteps, x_T.shape)
    x0, (log_probs, traj) = jax.lax.scan(step, x_T, (steps, eps))
    return x0, log_probs, traj


def sample_loop_n(model_fn: ModelFn, s: Schedule, n: jax.Array, x_T: jax.Array, rng: jax.Array,
                  temperature=1.0, clip: float = 0.0, prediction: str = "epsilon", clip_var: bool = False,
                  noise: NoiseFn = jax.random.normal):
    """:func:`sample_loop` for a traced number of steps ``n`` (DiSA's per-iteration counts):
    ``s`` holds tables of at least ``n`` steps (jax arrays; entries past ``n`` unused), and the
    loop runs ``n`` steps, so the work is proportional to ``n`` (a ``while`` loop; no log-probs,
    no gradients). With ``n`` equal to the tables' length it draws what :func:`sample_loop`
    draws: the same keys, step for step."""
    eps = step_noise(noise, rng, len(s.betas), x_T.shape)

    def step(j, x):
        return _draw_step(model_fn, s, x, n - 1 - j, eps[j], temperature, clip, prediction, clip_var)[0]

    return jax.lax.fori_loop(0, n, step, x_T)


def annealed_steps(num_iter: int, first: int | str, last: int) -> tuple[int, ...]:
    """DiSA's diffusion steps per MAR iteration: linear from ``first`` (the first iteration;
    a plain count, e.g. ``"25"``, not a respacing spec) to ``last`` (the last one), rounded."""
    if not str(first).isdigit() or not 2 <= last <= int(first):
        raise ValueError(f"diffusion step annealing runs from the first iteration's plain step count "
                         f"({str(first)!r}) down to at least 2, not to {last}")
    first = int(first)
    if num_iter == 1:
        return (first,)
    return tuple(int(round(first - (first - last) * k / (num_iter - 1))) for k in range(num_iter))


def stacked_schedules(diff_cfg: Any, counts: tuple[int, ...]) -> Schedule:
    """One respaced schedule per entry of ``counts``, stacked ``[len(counts), max(counts)]``
    (float32 tables, int32 timestep maps; each row padded with its last entry)."""
    width = max(counts)

    def pad(table: np.ndarray) -> np.ndarray:
        return np.pad(table, (0, width - len(table)), mode="edge")

    rows = [make_schedule(diff_cfg.num_timesteps, str(c), diff_cfg.noise_schedule) for c in counts]
    return Schedule(*(np.stack([pad(np.asarray(getattr(r, f))) for r in rows]).astype(
        np.int32 if f == "timestep_map" else np.float32) for f in Schedule._fields))


def sampling_steps(diff_cfg: Any, num_steps) -> int:
    """How many steps the sampler takes for ``num_steps`` (None: the config's)."""
    return _sampling_schedule(diff_cfg, num_steps).num_timesteps


def _sampling_schedule(diff_cfg: Any, num_steps) -> Schedule:
    steps = diff_cfg.num_sampling_steps if num_steps is None else num_steps
    return make_schedule(diff_cfg.num_timesteps, str(steps), diff_cfg.noise_schedule)


def _is_guided(cfg_scale, guided) -> bool:
    if guided is not None:
        return bool(guided)
    try:
        return float(cfg_scale) != 1.0
    except jax.errors.ConcretizationTypeError:
        raise ValueError("a traced cfg_scale needs an explicit guided=True/False "
                         "(it fixes the batch layout)") from None


def sample(head_params: Any, head_cfg: Any, diff_cfg: Any, z: jax.Array, rng: jax.Array, *,
           temperature=1.0, cfg_scale=1.0, guided: bool | None = None, num_steps: int | str | None = None,
           return_trajectory: bool = False, schedule: tuple[Schedule, jax.Array] | None = None,
           noise: NoiseFn = jax.random.normal):
    """Samples one token per condition row: ``z [N, C]`` -> ``(x0 [M, D], log_probs [S, M])``.

    Unguided, ``M = N``. Guided (``cfg_scale != 1``, or ``guided=True`` when ``cfg_scale`` is
    traced), ``z`` is ``[cond; uncond]`` and ``M = N // 2``: both halves share the noise and
    follow the cond half's trajectory (the reference keeps only that half). Temperature
    scales the per-step noise, not the initial noise. ``return_trajectory`` adds the
    :func:`sample_loop` trajectory for :func:`trajectory_log_probs`.

    ``schedule=(tables, n)``: a row of :func:`stacked_schedules` and its traced step count
    instead of ``num_steps`` (:func:`sample_loop_n`); returns ``(x0, None)``.
    ``noise(key, shape)``: every standard normal draw, the initial one included (the MAR
    sampler draws for its largest window and keeps its own rows, so that a token's noise
    does not depend on the window it is drawn in).
    """
    guided = _is_guided(cfg_scale, guided)
    m = z.shape[0] // 2 if guided else z.shape[0]
    k_init, k_loop = jax.random.split(rng)
    x_T = noise(k_init, (m, head_cfg.token_dim)).astype(jnp.float32)
    if schedule is not None:
        if return_trajectory:
            raise ValueError("a traced step count (diffusion step annealing) records no trajectory")
        model_fn = head_model_fn(head_params, head_cfg, z, cfg_scale, guided)
        return sample_loop_n(model_fn, *schedule, x_T, k_loop, temperature, **_step_options(diff_cfg),
                             noise=noise), None
    s = _sampling_schedule(diff_cfg, num_steps)
    model_fn = head_model_fn(head_params, head_cfg, z, cfg_scale, guided, timesteps=s.timestep_map)
    x0, log_probs, traj = sample_loop(model_fn, s, x_T, k_loop, temperature, **_step_options(diff_cfg),
                                      noise=noise)
    return (x0, log_probs, traj) if return_trajectory else (x0, log_probs)


def trajectory_mean_logvar(head_params: Any, head_cfg: Any, diff_cfg: Any, z: jax.Array, traj: dict, *,
                           cfg_scale=1.0, guided: bool | None = None, num_steps: int | str | None = None):
    """``(mean, log_var)`` ``[S', M, D]`` of ``p(x_next | x)`` at every step of a recorded
    trajectory (any subset of its steps, sliced along the first axis) under ``head_params``;
    differentiable. Steps run one after another (``lax.map``) to bound memory."""
    guided = _is_guided(cfg_scale, guided)
    s = _sampling_schedule(diff_cfg, num_steps)
    model_fn = head_model_fn(head_params, head_cfg, z, cfg_scale, guided)

    opts = _step_options(diff_cfg)

    def one(step):
        return _step_mean_logvar(model_fn, s, step["x"], step["t"], **opts)

    return jax.lax.map(one, {k: traj[k] for k in ("t", "x")})


def trajectory_log_probs(head_params: Any, head_cfg: Any, diff_cfg: Any, z: jax.Array, traj: dict, *,
                         temperature=1.0, cfg_scale=1.0, guided: bool | None = None,
                         num_steps: int | str | None = None) -> jax.Array:
    """Per-step log-probs ``[S', M]`` of a recorded trajectory under ``head_params``
    (:func:`trajectory_mean_logvar`); the noiseless ``t == 0`` step scores 0."""
    mean, log_var = trajectory_mean_logvar(head_params, head_cfg, diff_cfg, z, traj, cfg_scale=cfg_scale,
                                           guided=guided, num_steps=num_steps)
    lp = step_log_prob(mean, log_var, traj["x_next"], temperature)
    return jnp.where(traj["t"][:, None] > 0, lp, 0.0)
