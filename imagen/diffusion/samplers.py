"""Reverse-process samplers (DDPM, DDIM, DPM-Solver++(2M) and (3M), UniPC), their options (`SamplingConfig`) and the one loop.

Samplers hold no weights and take a denoiser callable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch

from imagen.config import (
    DEFAULT_AUG_LEVEL,
    DEFAULT_GUIDANCE,
    DEFAULT_PERCENTILE,
    DEFAULT_SAMPLER,
    DEFAULT_SAMPLING_BATCH_SIZE,
    DEFAULT_SAMPLING_STEPS,
    DEFAULT_STRENGTH,
    DEFAULT_THRESHOLD,
    MAX_SAMPLES_PER_PROMPT,
    SAMPLER_NAMES,
)

from imagen.diffusion.process import (
    OBJECTIVES,
    predict_eps_from_v,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_v,
    q_sample,
    randn,
)
from imagen.diffusion.schedules import NoiseSchedule, spaced_timesteps
from imagen.diffusion.thresholding import THRESHOLDS, apply_threshold
from imagen.errors import GenerationError

# Every sampler walks the timesteps of `spaced_timesteps` ("trailing": evenly spaced, starting at T-1) and takes
# its last step from the smallest of them straight to t = -1, the clean data. Coefficients come from alphas_cumprod
# at the strided timesteps, so any number of steps <= T is a valid respacing (Nichol & Dhariwal 2021, sec. 4).
# Per-step scalars are Python floats (float64), so x keeps its own dtype.


def _randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    return randn(x.shape, generator, dtype=x.dtype, device=x.device)  # generator: one, or one per sample


class Sampler:
    """Base sampler: `set_timesteps(n)`, then `step(pred_x0, eps, t, t_prev, x_t)` once per timestep."""

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule
        self.timesteps: list[int] = []

    def set_timesteps(self, steps: int) -> list[int]:
        """Choose `steps` trailing timesteps starting at T-1 and forget any multistep history."""
        self.timesteps = spaced_timesteps(self.schedule.num_timesteps, steps)
        self.reset()
        return self.timesteps

    def reset(self) -> None:
        """Forget state carried between steps (only multistep solvers have any)."""

    def step(self, pred_x0, eps, t: int, t_prev: int, x_t, generator=None) -> torch.Tensor:
        raise NotImplementedError


class DDPMSampler(Sampler):
    """Ancestral sampling from the posterior q(x_{t_prev} | x_t, x0) (Ho et al. 2020, eqs. 6-7)."""

    def posterior_coefficients(self, t: int, t_prev: int) -> tuple[float, float, float]:
        """(coef_x0, coef_xt, variance) of eq. 7 for the (possibly strided) step t -> t_prev."""
        abar_t, abar_prev = self.schedule.abar(t), self.schedule.abar(t_prev)
        alpha = abar_t / abar_prev  # alpha of the strided step, so that abar_t = alpha * abar_prev
        beta = 1.0 - alpha
        coef_x0 = beta * math.sqrt(abar_prev) / (1.0 - abar_t)  # (7) mu~ first term
        coef_xt = math.sqrt(alpha) * (1.0 - abar_prev) / (1.0 - abar_t)  # (7) mu~ second term
        variance = beta * (1.0 - abar_prev) / (1.0 - abar_t)  # (7) beta~_t; zero for the step to clean data
        return coef_x0, coef_xt, variance

    def step(self, pred_x0, eps, t, t_prev, x_t, generator=None):
        coef_x0, coef_xt, variance = self.posterior_coefficients(t, t_prev)
        mean = coef_x0 * pred_x0 + coef_xt * x_t
        if variance == 0.0:
            return mean
        return mean + math.sqrt(variance) * _randn_like(x_t, generator)


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021, eq. 12); eta = 0 is deterministic, eta = 1 matches DDPM's variance."""

    def __init__(self, schedule: NoiseSchedule, eta: float = 0.0):
        super().__init__(schedule)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = eta

    def step(self, pred_x0, eps, t, t_prev, x_t, generator=None):
        abar_t, abar_prev = self.schedule.abar(t), self.schedule.abar(t_prev)
        # (16): sigma_t(eta) = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)
        sigma = self.eta * math.sqrt((1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev))
        # (12): x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z
        x_prev = math.sqrt(abar_prev) * pred_x0 + math.sqrt(max(1.0 - abar_prev - sigma**2, 0.0)) * eps
        if sigma == 0.0:
            return x_prev
        return x_prev + sigma * _randn_like(x_t, generator)


class DPMSolverPP2MSampler(Sampler):
    """DPM-Solver++(2M), multistep second order in data prediction (Lu et al. 2022, Algorithm 2)."""

    def reset(self):
        self._prev_x0: torch.Tensor | None = None
        self._prev_h: float | None = None

    def step(self, pred_x0, eps, t, t_prev, x_t, generator=None):
        alpha_s, sigma_s = self.schedule.alpha_sigma(t)
        alpha_t, sigma_t = self.schedule.alpha_sigma(t_prev)
        if sigma_t == 0.0:
            # Final step to clean data: first order ("lower_order_final"); with sigma_t = 0 the update is x0 itself.
            self.reset()
            return pred_x0
        h = self.schedule.half_log_snr(t_prev) - self.schedule.half_log_snr(t)  # h_i = lambda_{t_i} - lambda_{t_i-1}
        if self._prev_x0 is None:
            D = pred_x0  # first step: first order (DPM-Solver++(1) = DDIM)
        else:
            r = self._prev_h / h
            D = (1 + 1 / (2 * r)) * pred_x0 - 1 / (2 * r) * self._prev_x0  # D_i = (1 + 1/2r) x0_i - 1/2r x0_{i-1}
        # x_{t_i} = (sigma_{t_i} / sigma_{t_i-1}) x_{t_i-1} - alpha_{t_i} (e^{-h_i} - 1) D_i
        x_prev = (sigma_t / sigma_s) * x_t - alpha_t * math.expm1(-h) * D
        self._prev_x0, self._prev_h = pred_x0, h
        return x_prev


# Where the multistep solvers below start. The cosine schedule's log-SNR goes to -inf at t = T (f(T) = 0 in
# Nichol & Dhariwal's eq. 17; its last beta is clipped at 0.999), so its noisiest timesteps are degenerate in lambda:
# at T = 1000, lambda = -9.9, -6.5, -5.8, -5.4 at t = 999..996, then -5.1 at t = 995. Solvers that step in lambda
# would spend their first step on that tail (h = 8.3 instead of 3.5 at 8 steps), and the third-order one would fit
# its polynomial through a data prediction made where there is no signal (alpha = 5e-5) at a node far from the
# others. So these solvers space their timesteps over [0, t_max] instead, t_max the noisiest timestep with
# lambda >= LAMBDA_MIN, as diffusers' `lambda_min_clipped` does. -5.1 keeps every timestep of the linear schedule
# (lambda(T-1) = -5.06 at T = 1000) and drops the cosine schedule's last 4 of 1000 (the last 1 of 250), starting it
# at alpha = 0.006: x_T ~ N(0, I) then differs from the true marginal there by 0.6% of the data's amplitude, under
# one 8-bit grey level. DDIM, DDPM and DPM-Solver++(2M) keep starting at T-1, as before.
LAMBDA_MIN = -5.1


def clipped_num_timesteps(schedule: NoiseSchedule, lambda_min: float = LAMBDA_MIN) -> int:
    """How many timesteps, from t = 0, have half log-SNR >= lambda_min (at least one)."""
    # log_snr decreases in t, so this counts a prefix; log_snr is 2 lambda.
    return max(1, int((schedule.log_snr >= 2 * lambda_min).sum()))


class _MultistepSampler(Sampler):
    """What DPM-Solver++(3M) and UniPC share: the lambda-clipped timesteps and the history of data predictions."""

    def __init__(self, schedule: NoiseSchedule):
        super().__init__(schedule)
        self.reset()

    def set_timesteps(self, steps: int) -> list[int]:
        T = clipped_num_timesteps(self.schedule)
        if not 0 < steps <= T:
            raise GenerationError(f"steps must be in [1, {T}] for this sampler on this schedule (it skips the "
                                  f"timesteps whose log-SNR / 2 is under {LAMBDA_MIN}), got {steps}")
        self.timesteps = spaced_timesteps(T, steps)
        self.reset()
        return self.timesteps

    def reset(self):
        self._lambdas: list[float] = []  # lambda of each data prediction in `_x0s`, oldest first
        self._x0s: list[torch.Tensor] = []

    def _remember(self, t: int, pred_x0: torch.Tensor, keep: int) -> None:
        self._lambdas = (self._lambdas + [self.schedule.half_log_snr(t)])[-keep:]
        self._x0s = (self._x0s + [pred_x0])[-keep:]

    def _order(self, t_prev: int, max_order: int) -> int:
        """The order of the step into t_prev: as high as the history allows, lower at the end (the last step lands
        on sigma = 0, where only the first-order update is defined; the one before takes at most second order)."""
        if t_prev < 0:
            return 1
        order = min(max_order, len(self._x0s))
        return min(order, 2) if self.timesteps and t_prev == self.timesteps[-1] else order


class DPMSolverPP3MSampler(_MultistepSampler):
    """DPM-Solver++(3M): multistep third order in data prediction (Lu et al. 2022, "DPM-Solver++", sec. 4-5).

    The second-derivative term weighs x0'' = 2 f[s0, s1, s2] by c3, as Taylor's theorem gives; the authors' released
    code (and diffusers') weighs it half as much (`phi_3 * D2`), which leaves the method second order
    (tests/test_diffusion_samplers.py measures both).
    """

    def step(self, pred_x0, eps, t, t_prev, x_t, generator=None):
        self._remember(t, pred_x0, keep=3)
        order = self._order(t_prev, 3)
        if t_prev < 0:
            return pred_x0  # first order onto sigma = 0: the data prediction itself
        alpha_t, sigma_t = self.schedule.alpha_sigma(t_prev)
        sigma_s = self.schedule.alpha_sigma(t)[1]
        lam_s, h = self._lambdas[-1], self.schedule.half_log_snr(t_prev) - self._lambdas[-1]
        # The data-prediction ODE solved exactly, x_t = (sigma_t/sigma_s) x_s + sigma_t int e^lambda x0(lambda) dlambda
        # (DPM-Solver++), with x0(lambda) replaced by its Taylor polynomial at lambda_s: x_t = (sigma_t/sigma_s) x_s + alpha_t (c1 x0 + c2 x0' + c3 x0''), where
        # c_k = e^{-h} int_0^h e^u u^{k-1}/(k-1)! du: c1 = 1 - e^{-h}, c2 = h - c1, c3 = h^2/2 - c2.
        c1 = -math.expm1(-h)
        c2 = h - c1
        c3 = h * h / 2 - c2
        x_prev = (sigma_t / sigma_s) * x_t + alpha_t * c1 * pred_x0
        if order >= 2:
            # Derivatives of the Newton polynomial through the last `order` data predictions (nodes in lambda).
            h0 = lam_s - self._lambdas[-2]
            d1_0 = (pred_x0 - self._x0s[-2]) / h0  # first divided difference
            if order == 2:
                x_prev = x_prev + alpha_t * c2 * d1_0
            else:
                h1 = self._lambdas[-2] - self._lambdas[-3]
                d1_1 = (self._x0s[-2] - self._x0s[-3]) / h1
                d2 = (d1_0 - d1_1) / (h0 + h1)  # second divided difference = x0'' / 2
                x_prev = x_prev + alpha_t * c2 * (d1_0 + h0 * d2) + alpha_t * c3 * (2 * d2)
        return x_prev


class UniPCSampler(_MultistepSampler):
    """UniPC (Zhao et al. 2023): the UniP-2 predictor and the UniC corrector, B(h) = e^{-h} - 1 ("bh2"), data
    prediction. The corrector needs the model at the point the predictor reached, so it runs at the start of the
    next step on that step's evaluation: no extra network call, and the step from there starts at the corrected x.
    Every update is per element, so under inpainting the known region, which `sample` resets after each step,
    never reaches the generated one."""

    max_order = 2

    def reset(self):
        super().reset()
        self._last: tuple[torch.Tensor, int, int] | None = None  # (x at the previous timestep, that timestep, order)

    @staticmethod
    def _rhos(h: float, rks: list[float]) -> list[float]:
        """UniPC's order conditions, sum_m rho_m r_m^(k-1) = k! g_k / B(h) for k = 1..len(rks), with B(h) = e^{-h} - 1
        ("bh2"), g_1 = (e^{-h} - 1)/(-h) - 1 and g_{k+1} = g_k/(-h) - 1/(k+1)!; at most two unknowns."""
        hh = -h
        B = math.expm1(hh)
        g, fact, b = math.expm1(hh) / hh - 1, 1, []
        for k in range(1, len(rks) + 1):
            b.append(g * fact / B)
            fact *= k + 1
            g = g / hh - 1 / fact
        if len(rks) == 1:
            return b
        (r0, r1), (b0, b1) = rks, b  # rho0 + rho1 = b0, rho0 r0 + rho1 r1 = b1
        rho1 = (b1 - r0 * b0) / (r1 - r0)
        return [b0 - rho1, rho1]

    def _update(self, x_s, t, t_prev, m0, D, rhos):
        """x_t = (sigma_t/sigma_s) x_s - alpha_t (e^{-h} - 1) m0 - alpha_t B(h) sum_m rho_m D_m, B(h) = e^{-h} - 1."""
        alpha_t, sigma_t = self.schedule.alpha_sigma(t_prev)
        sigma_s = self.schedule.alpha_sigma(t)[1]
        B = math.expm1(self.schedule.half_log_snr(t) - self.schedule.half_log_snr(t_prev))  # e^{-h} - 1
        x = (sigma_t / sigma_s) * x_s - alpha_t * B * m0
        for rho, d in zip(rhos, D):
            x = x - alpha_t * B * rho * d
        return x

    def step(self, pred_x0, eps, t, t_prev, x_t, generator=None):
        if self._last is not None:
            # UniC: correct the point the last step reached with the data prediction made there (pred_x0).
            x_s, s, order = self._last
            m0, h = self._x0s[-1], self.schedule.half_log_snr(t) - self._lambdas[-1]
            rks, D = [], []
            if order == 2:
                r = (self._lambdas[-2] - self._lambdas[-1]) / h
                rks.append(r)
                D.append((self._x0s[-2] - m0) / r)
            rks.append(1.0)
            D.append(pred_x0 - m0)
            rhos = [0.5] if order == 1 else self._rhos(h, rks)
            x_t = self._update(x_s, s, t, m0, D, rhos)
        self._remember(t, pred_x0, keep=2)
        order = self._order(t_prev, self.max_order)
        self._last = (x_t, t, order)
        if t_prev < 0:
            return pred_x0  # first order onto sigma = 0: the data prediction itself
        D, rhos = [], []
        if order == 2:
            # UniP-2: one earlier data prediction; rho = 1/2, the h -> 0 limit of the order condition.
            h = self.schedule.half_log_snr(t_prev) - self._lambdas[-1]
            r = (self._lambdas[-2] - self._lambdas[-1]) / h
            D, rhos = [(self._x0s[-2] - pred_x0) / r], [0.5]
        return self._update(x_t, t, t_prev, pred_x0, D, rhos)


SAMPLERS = dict(zip(SAMPLER_NAMES, (DPMSolverPP2MSampler, DDIMSampler, DDPMSampler, DPMSolverPP3MSampler, UniPCSampler)))


def check_sampler(name: str, eta: float = 0.0) -> None:
    """Raise a one-line GenerationError unless `name` is a sampler of SAMPLERS that takes this `eta`."""
    if name not in SAMPLERS:
        raise GenerationError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    if eta < 0:
        raise GenerationError(f"eta must be >= 0, got {eta}")
    if eta != 0.0 and name != "ddim":
        raise GenerationError(f"eta={eta} only applies to the 'ddim' sampler, not {name!r}")


def make_sampler(name: str, schedule: NoiseSchedule, eta: float = 0.0) -> Sampler:
    """Build a sampler by name, one of SAMPLERS (`eta` applies to DDIM only)."""
    check_sampler(name, eta)
    if name == "ddim":
        return DDIMSampler(schedule, eta)
    return SAMPLERS[name](schedule)


@dataclass(frozen=True)
class SamplingConfig:
    """Every option of text-to-image sampling, validated once; it travels as one object from the CLI to `sample`.

    `sample` reads sampler, steps, threshold, percentile, eta and strength; the pipeline reads stage_steps,
    guidance, negative, compose, aug_level, seed, n (samples per prompt) and batch_size.
    `compose` reads each prompt as parts joined by " AND " ("a red circle AND a blue square") and samples their
    conjunction (composable diffusion, Liu et al. 2022): every part is guided at `guidance` against one
    unconditional branch, so a step costs parts + 1 U-Net evaluations instead of 2.
    `stage_steps` gives named stages of a cascade their own step count ({"base": 8} with steps=25: eight at the base
    stage, 25 at the others), e.g. a guidance-distilled base stage that holds at few steps before super-resolution
    stages that need more; it is kept as sorted (name, steps) pairs, so a config stays hashable.
    """

    sampler: str = DEFAULT_SAMPLER
    steps: int = DEFAULT_SAMPLING_STEPS
    stage_steps: Mapping[str, int] | tuple[tuple[str, int], ...] = ()  # stage name -> steps; the others take `steps`
    guidance: float = DEFAULT_GUIDANCE  # classifier-free guidance scale; 1 = off
    negative: str | None = None  # negative prompt: takes the place of the empty prompt in guidance
    compose: bool = False  # prompts are parts joined by " AND ", sampled as a conjunction
    threshold: str = DEFAULT_THRESHOLD
    percentile: float = DEFAULT_PERCENTILE  # dynamic thresholding only
    eta: float = 0.0  # DDIM only
    aug_level: float = DEFAULT_AUG_LEVEL  # super-resolution stages: noise level of the low-res input, in [0, 1]
    strength: float = DEFAULT_STRENGTH  # image-to-image: share of the steps run from the noised init image
    seed: int = 0  # same seed, same images
    n: int = 1  # samples per prompt
    batch_size: int = DEFAULT_SAMPLING_BATCH_SIZE  # samples denoised at once; the images do not depend on it

    def __post_init__(self):
        for name in ("guidance", "percentile", "aug_level", "strength", "eta"):
            value = getattr(self, name)  # the Python API can pass anything; the CLI has parsed numbers already
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise GenerationError(f"{name} must be a finite number, got {value!r}")
        check_sampler(self.sampler, self.eta)
        if not isinstance(self.compose, bool):
            raise GenerationError(f"compose must be true or false, got {self.compose!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps <= 0:
            raise GenerationError(f"steps must be a positive integer, got {self.steps!r}")
        object.__setattr__(self, "stage_steps", _stage_steps(self.stage_steps))
        if self.guidance < 0:
            raise GenerationError(f"guidance must be >= 0, got {self.guidance}")
        if self.threshold not in THRESHOLDS:
            raise GenerationError(f"unknown threshold {self.threshold!r}; choose one of: {', '.join(THRESHOLDS)}")
        if not 0.0 < self.percentile <= 1.0:
            raise GenerationError(f"percentile must be in (0, 1], got {self.percentile}")
        if not 0.0 <= self.aug_level <= 1.0:
            raise GenerationError(f"aug_level must be in [0, 1], got {self.aug_level}")
        if not 0.0 < self.strength <= 1.0:
            raise GenerationError(f"strength must be in (0, 1], got {self.strength}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or not 0 < self.n <= MAX_SAMPLES_PER_PROMPT:
            raise GenerationError(f"n (samples per prompt) must be a positive integer, at most {MAX_SAMPLES_PER_PROMPT}, got {self.n!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise GenerationError(f"batch size must be a positive integer, got {self.batch_size!r}")

    def for_stage(self, name: str) -> "SamplingConfig":
        """This config as stage `name` samples with it: its own step count when `stage_steps` names it."""
        steps = dict(self.stage_steps).get(name)
        return self if steps is None or steps == self.steps else replace(self, steps=steps, stage_steps=())


def _stage_steps(value) -> tuple[tuple[str, int], ...]:
    """`SamplingConfig.stage_steps` as sorted (name, steps) pairs, or a GenerationError naming the bad entry."""
    pairs = value.items() if isinstance(value, Mapping) else value
    try:
        pairs = [(name, steps) for name, steps in pairs]
    except (TypeError, ValueError):
        raise GenerationError(f"stage_steps must map stage names to step counts, e.g. {{'base': 8}}, got {value!r}") from None
    for name, steps in pairs:
        if not isinstance(name, str) or not name:
            raise GenerationError(f"stage_steps: a stage name must be a non-empty string, got {name!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
            raise GenerationError(f"stage_steps: steps of stage {name!r} must be a positive integer, got {steps!r}")
    names = [name for name, _ in pairs]
    if len(set(names)) < len(names):
        raise GenerationError(f"stage_steps names a stage twice: {', '.join(names)}")
    return tuple(sorted(pairs))


def model_output_to_x0_eps(
    schedule: NoiseSchedule,
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    objective: str = "eps",
    threshold: str = DEFAULT_THRESHOLD,
    percentile: float = DEFAULT_PERCENTILE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a denoiser's eps / v / x0 output into (thresholded pred_x0, eps consistent with it)."""
    if objective == "eps":
        pred_x0, eps = predict_x0_from_eps(schedule, x_t, t, model_output), model_output
    elif objective == "v":
        pred_x0 = predict_x0_from_v(schedule, x_t, t, model_output)
        eps = predict_eps_from_v(schedule, x_t, t, model_output)
    elif objective == "x0":
        pred_x0, eps = model_output, predict_eps_from_x0(schedule, x_t, t, model_output)
    else:
        raise ValueError(f"unknown objective {objective!r}; choose one of {list(OBJECTIVES)}")
    if threshold == "none":
        return pred_x0, eps
    pred_x0 = apply_threshold(pred_x0, threshold, percentile)
    # Re-derive eps from the clipped x0 so the update stays on the line through x_t (as in guided-diffusion's DDIM).
    return pred_x0, predict_eps_from_x0(schedule, x_t, t, pred_x0)


def _noise_to(schedule: NoiseSchedule, x0: torch.Tensor, t: int, generator) -> torch.Tensor:
    # q_sample at a scalar timestep; t = -1 returns x0 itself.
    if t < 0:
        return x0
    t_batch = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
    return q_sample(schedule, x0, t_batch, _randn_like(x0, generator))


@torch.no_grad()
def sample(
    denoiser: Callable[..., torch.Tensor],
    shape,
    *,
    schedule: NoiseSchedule,
    config: SamplingConfig | None = None,
    objective: str = "eps",
    cond: dict | None = None,
    generator: torch.Generator | None = None,
    x_T: torch.Tensor | None = None,
    init_x0: torch.Tensor | None = None,
    inpaint_mask: torch.Tensor | None = None,
    known_x0: torch.Tensor | None = None,
    callback: Callable | None = None,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw x0 from `denoiser(x_t, t, **cond)` by reverse diffusion (text-to-image, image-to-image, inpainting).

    `config` gives the sampler, steps, threshold (and percentile), eta and strength; its guidance belongs to the
    denoiser (see `classifier_free_guidance`). `objective` is what the denoiser predicts: eps, v or x0.
    Image-to-image (SDEdit, Meng et al. 2022): `init_x0` is noised to the timestep reached after skipping the
    first (1 - strength) of the steps, and sampling runs the rest. Inpainting (RePaint, Lugmayr et al. 2022):
    `inpaint_mask` is 1 where pixels are generated and 0 where `known_x0` is kept; after every step the known
    region is replaced by `known_x0` noised to the new timestep, so the result equals `known_x0` there.
    `x_T` fixes the starting noise; `callback(i, t, x_t, pred_x0)` sees every step (with UniPC, x_t is the
    predictor's point, where the model is evaluated next; the corrector refines it inside the next step).
    `generator` is one torch.Generator or a list of one per sample (`sample_generators`), so a sample's noise is
    its own.
    """
    config = config if config is not None else SamplingConfig()
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {list(OBJECTIVES)}")
    if (inpaint_mask is None) != (known_x0 is None):
        raise ValueError("inpainting needs both inpaint_mask and known_x0")
    steps, strength = config.steps, config.strength
    solver = make_sampler(config.sampler, schedule, config.eta)
    timesteps = solver.set_timesteps(steps)
    cond = cond or {}

    x = x_T if x_T is not None else randn(shape, generator, device=device, dtype=dtype)
    if init_x0 is not None:
        timesteps = timesteps[steps - max(1, round(strength * steps)) :]
        t_start = torch.full((x.shape[0],), timesteps[0], dtype=torch.long, device=x.device)
        x = q_sample(schedule, init_x0.to(x), t_start, x)  # x_T serves as the noise of the forward jump
    if inpaint_mask is not None:
        inpaint_mask, known_x0 = inpaint_mask.to(x), known_x0.to(x)
        x = inpaint_mask * x + (1 - inpaint_mask) * _noise_to(schedule, known_x0, timesteps[0], generator)

    # The denoising loop, written once for every sampler.
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        model_output = denoiser(x, t_batch, **cond)
        pred_x0, eps = model_output_to_x0_eps(schedule, model_output, x, t_batch, objective, config.threshold, config.percentile)
        x = solver.step(pred_x0, eps, t, t_prev, x, generator)
        if inpaint_mask is not None:
            x = inpaint_mask * x + (1 - inpaint_mask) * _noise_to(schedule, known_x0, t_prev, generator)
        if callback is not None:
            callback(i, t, x, pred_x0)
    return x
