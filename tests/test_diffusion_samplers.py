"""Samplers against the published update rules (hand-computed in float math) and against known distributions."""

import math

import pytest
import torch

from imagen.diffusion import (
    SAMPLERS,
    DDIMSampler,
    DDPMSampler,
    NoiseSchedule,
    SamplingConfig,
    make_sampler,
    sample,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest.one_thread


T = 1000
LINEAR = NoiseSchedule.from_name("linear", T=T)
COSINE = NoiseSchedule.from_name("cosine", T=T)
_BETAS = [1e-4 + i * (0.02 - 1e-4) / (T - 1) for i in range(T)]  # Ho et al. 2020, sec. 4


def _abar(t):
    """alphas_cumprod of the linear schedule, by hand; 1 for t = -1 (clean data)."""
    return math.prod(1 - b for b in _BETAS[: t + 1])


def _x(seed=0, shape=(2, 3, 4)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class Recorder:
    """Wraps a denoiser and keeps every (x_t, t) it was called with."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x_t, t, **cond):
        self.calls.append((x_t.clone(), t.clone()))
        return self.fn(x_t, t)


def _trajectory(denoiser, **kw):
    xs = []
    out = sample(denoiser, None, callback=lambda i, t, x, pred_x0: xs.append(x.clone()), **kw)
    return xs, out


def test_ddim_eta0_step_is_eq_12():
    x_T, eps = _x(0), 0.1
    xs, _ = _trajectory(lambda x, t: torch.full_like(x, eps), schedule=LINEAR,
                        config=SamplingConfig(sampler="ddim", steps=2, threshold="none"), x_T=x_T)
    a_t, a_prev = _abar(999), _abar(499)  # steps=2 -> timesteps [999, 499]
    pred_x0 = (x_T - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    expected = math.sqrt(a_prev) * pred_x0 + math.sqrt(1 - a_prev) * eps  # (12) with sigma = 0
    torch.testing.assert_close(xs[0], expected, rtol=1e-9, atol=1e-9)


def test_ddim_eta1_noise_follows_sigma_formula():
    x_t, pred_x0, eps = _x(1), _x(2).clamp(-1, 1), _x(3)
    t, t_prev = 600, 350
    out = DDIMSampler(LINEAR, eta=1.0).step(pred_x0, eps, t, t_prev, x_t, torch.Generator().manual_seed(7))
    a_t, a_prev = _abar(t), _abar(t_prev)
    sigma = math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)  # (16) with eta = 1
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    expected = math.sqrt(a_prev) * pred_x0 + math.sqrt(1 - a_prev - sigma**2) * eps + sigma * z
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    # eta = 1 is DDPM's posterior variance.
    assert sigma**2 == pytest.approx(DDPMSampler(LINEAR).posterior_coefficients(t, t_prev)[2], rel=1e-9)


@pytest.mark.parametrize("t, t_prev", [(500, 499), (1, 0), (600, 350)])
def test_ddpm_posterior_is_eq_7(t, t_prev):
    a_t, a_prev = _abar(t), _abar(t_prev)
    # For a strided step the effective beta is 1 - abar_t / abar_prev; unstrided it is beta_t itself.
    beta = _BETAS[t] if t_prev == t - 1 else 1 - a_t / a_prev
    coef_x0 = beta * math.sqrt(a_prev) / (1 - a_t)
    coef_xt = math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)
    var = beta * (1 - a_prev) / (1 - a_t)
    assert DDPMSampler(LINEAR).posterior_coefficients(t, t_prev) == pytest.approx((coef_x0, coef_xt, var), rel=1e-9)

    x_t, pred_x0 = _x(1), _x(2)
    out = DDPMSampler(LINEAR).step(pred_x0, None, t, t_prev, x_t, torch.Generator().manual_seed(3))
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(out, coef_x0 * pred_x0 + coef_xt * x_t + math.sqrt(var) * z, rtol=1e-9, atol=1e-9)


def test_dpmpp2m_matches_algorithm_2():
    f = lambda x, t: 0.8 * torch.tanh(x) + 1e-4 * t.double()[:, None, None]  # noqa: E731  a known x0(x_t, t)
    x_T = _x(4)
    xs, out = _trajectory(f, schedule=LINEAR, config=SamplingConfig(sampler="dpmpp2m", steps=3, threshold="none"), x_T=x_T, objective="x0")
    ts = [999, 666, 332]  # trailing spacing for 3 steps, then clean data

    def alpha_sigma_lam(t):
        a = math.sqrt(_abar(t))
        s = math.sqrt(1 - _abar(t))
        return a, s, math.log(a / s)

    a0, s0, l0 = alpha_sigma_lam(ts[0])
    a1, s1, l1 = alpha_sigma_lam(ts[1])
    a2, s2, l2 = alpha_sigma_lam(ts[2])
    t0 = lambda t: torch.full((2,), t)  # noqa: E731
    # Step 1, first order: x_1 = (s1/s0) x_0 - a1 (e^{-h1} - 1) x0_0
    x0_0 = f(x_T, t0(ts[0]))
    h1 = l1 - l0
    x1 = (s1 / s0) * x_T - a1 * (math.exp(-h1) - 1) * x0_0
    torch.testing.assert_close(xs[0], x1, rtol=1e-9, atol=1e-9)
    # Step 2, second order: r = h1/h2, D = (1 + 1/2r) x0_1 - 1/2r x0_0
    x0_1 = f(x1, t0(ts[1]))
    h2 = l2 - l1
    r = h1 / h2
    D = (1 + 1 / (2 * r)) * x0_1 - 1 / (2 * r) * x0_0
    x2 = (s2 / s1) * x1 - a2 * (math.exp(-h2) - 1) * D
    torch.testing.assert_close(xs[1], x2, rtol=1e-9, atol=1e-9)
    # Final step to sigma = 0, first order: the data prediction itself.
    torch.testing.assert_close(out, f(x2, t0(ts[2])), rtol=1e-12, atol=1e-12)


def _point_denoiser(schedule, c, objective):
    """The exact optimal denoiser for the one-point dataset {c}, for each objective."""

    def den(x_t, t):
        a = schedule.sqrt_alphas_cumprod[t].reshape(-1, 1).to(x_t)
        s = schedule.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1).to(x_t)
        eps = (x_t - a * c) / s
        return {"eps": eps, "x0": c.expand_as(x_t), "v": a * eps - s * c}[objective]

    return den


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("objective", ["eps", "v", "x0"])
@pytest.mark.parametrize("schedule", [COSINE, LINEAR], ids=["cosine", "linear"])
def test_samplers_recover_single_point(sampler, objective, schedule):
    c = torch.tensor([0.7, -0.3, 0.05, -0.95])
    out = sample(_point_denoiser(schedule, c, objective), (8, 4), schedule=schedule, config=SamplingConfig(sampler=sampler, steps=10),
                 objective=objective, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, c.expand(8, 4), rtol=0, atol=1e-3)


@pytest.mark.parametrize("sampler, steps", [("dpmpp2m", 20), ("ddpm", 250)])
def test_gaussian_data_is_reproduced(sampler, steps):
    mu, std = 0.3, 0.5

    def den(x_t, t):  # optimal eps for x0 ~ N(mu, std^2 I): E[eps | x_t] = sigma (x_t - alpha mu) / Var[x_t]
        a = COSINE.sqrt_alphas_cumprod[t].reshape(-1, 1).to(x_t)
        s = COSINE.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1).to(x_t)
        return s * (x_t - a * mu) / (a**2 * std**2 + s**2)

    out = sample(den, (2000, 3), schedule=COSINE, config=SamplingConfig(sampler=sampler, steps=steps, threshold="none"),
                 generator=torch.Generator().manual_seed(0))
    assert out.mean().item() == pytest.approx(mu, abs=0.05)
    assert out.std().item() == pytest.approx(std, abs=0.05)


def _ddpm_gaussian_moments(steps, mu, std):
    """Mean and std of DDPM's output for x0 ~ N(mu, std^2) with the optimal denoiser, propagated exactly.

    Everything is linear-Gaussian: pred_x0 = A x_t + B, and each step of eq. 7 maps (m, V) to
    (c0 (A m + B) + ct m, (c0 A + ct)^2 V + beta~). Coefficients from the hand-computed linear schedule.
    """
    ts = [999 - i * 1000 // steps for i in range(steps)] + [-1]  # trailing spacing, then clean data
    m, V = 0.0, 1.0
    for t, t_prev in zip(ts, ts[1:]):
        a_t, a_prev = _abar(t), (_abar(t_prev) if t_prev >= 0 else 1.0)
        k = (1 - a_t) / (a_t * std**2 + 1 - a_t)  # sigma * E[eps | x_t] / alpha = k (x_t - alpha mu) / alpha
        A, B = (1 - k) / math.sqrt(a_t), k * mu
        beta = 1 - a_t / a_prev
        c0, ct = beta * math.sqrt(a_prev) / (1 - a_t), math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)
        m, V = c0 * (A * m + B) + ct * m, (c0 * A + ct) ** 2 * V + beta * (1 - a_prev) / (1 - a_t)
    return m, math.sqrt(V)


def test_ddpm_output_has_the_exact_gaussian_moments():
    # 100 coarse DDPM steps do not quite reproduce std 0.5 (beta~ ignores the uncertainty of pred_x0): the exact
    # propagation gives 0.4682. 100 000 draws pin the std to about +-0.0015, so 10 % excess noise per step
    # (std 0.514) or a missing noise term fails, while the true sampler passes.
    mu, std = 0.3, 0.5
    exp_mean, exp_std = _ddpm_gaussian_moments(100, mu, std)
    assert exp_mean == pytest.approx(mu, abs=1e-5) and exp_std == pytest.approx(0.4682, abs=1e-4)

    def den(x_t, t):
        a = LINEAR.sqrt_alphas_cumprod[t].reshape(-1, 1).to(x_t)
        s = LINEAR.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1).to(x_t)
        return s * (x_t - a * mu) / (a**2 * std**2 + s**2)

    out = sample(den, (100_000, 1), schedule=LINEAR, config=SamplingConfig(sampler="ddpm", steps=100, threshold="none"),
                 generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert out.mean().item() == pytest.approx(exp_mean, abs=0.006)
    assert out.std().item() == pytest.approx(exp_std, abs=0.005)


def test_img2img_starts_from_noised_init():
    init, x_T = _x(5).clamp(-1, 1), _x(6)
    den = Recorder(lambda x, t: torch.zeros_like(x))
    calls = []
    sample(den, None, schedule=LINEAR, config=SamplingConfig(sampler="ddim", steps=10, strength=0.3, threshold="none"),
           x_T=x_T, init_x0=init, callback=lambda i, t, x, p: calls.append(t))
    assert calls == [299, 199, 99]  # the last 3 of the 10 trailing timesteps
    x_first, t_first = den.calls[0]
    assert t_first.tolist() == [299, 299]
    torch.testing.assert_close(x_first, math.sqrt(_abar(299)) * init + math.sqrt(1 - _abar(299)) * x_T,
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_inpainting_keeps_known_region(sampler):
    c = torch.tensor([0.5, -0.5, 0.25, 0.0])
    known = torch.tensor([-0.9, 0.8, 0.1, 0.6]).expand(3, 4)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])  # 1 = generate, 0 = keep known_x0
    x_T = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    den = Recorder(_point_denoiser(COSINE, c, "eps"))
    out = sample(den, (3, 4), schedule=COSINE, config=SamplingConfig(sampler=sampler, steps=8, threshold="static"), x_T=x_T,
                 inpaint_mask=mask, known_x0=known, generator=torch.Generator().manual_seed(2))
    assert torch.equal(out[:, 1::2], known[:, 1::2])  # exactly the known image at the end
    torch.testing.assert_close(out[:, ::2], c[::2].expand(3, 2), rtol=0, atol=1e-3)
    # Before the first step the known region is q_sample(known_x0, T-1) with the generator's first draw.
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    a, s = COSINE.alpha_sigma(999)
    x_first = den.calls[0][0]
    torch.testing.assert_close(x_first[:, 1::2], (a * known + s * z)[:, 1::2])
    assert torch.equal(x_first[:, ::2], x_T[:, ::2])


def test_sample_is_seeded_and_calls_back_every_step():
    den = _point_denoiser(COSINE, torch.zeros(2), "eps")
    seen = []
    a = sample(lambda x, t: den(x, t) + 0.1, (4, 2), schedule=COSINE, config=SamplingConfig(sampler="ddpm", steps=5),
               generator=torch.Generator().manual_seed(0), callback=lambda i, t, x, p: seen.append((i, t)))
    b = sample(lambda x, t: den(x, t) + 0.1, (4, 2), schedule=COSINE, config=SamplingConfig(sampler="ddpm", steps=5),
               generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert seen == [(0, 999), (1, 799), (2, 599), (3, 399), (4, 199)]
    assert a.abs().max() <= 1.0  # thresholding keeps pred_x0, hence the sample, in [-1, 1]


def test_default_thresholding_is_dynamic_with_exact_scale():
    # One step to clean data returns pred_x0 itself, so the output is the thresholded x0 prediction.
    # |x0| sorted = [0.5, 1.5, 2, 3]: the 0.995 quantile interpolates 2 + 0.985 * (3 - 2) = 2.985 (Imagen sec. 2.3);
    # static clipping would give [1, -1, 0.5, 1] instead.
    x0 = torch.tensor([[3.0, -2.0, 0.5, 1.5]], dtype=torch.float64)
    assert SamplingConfig().threshold == "dynamic" and SamplingConfig().percentile == 0.995
    for sampler in SAMPLERS:
        out = sample(lambda x, t: x0.expand_as(x), (1, 4), schedule=COSINE, config=SamplingConfig(sampler=sampler, steps=1),
                     objective="x0", generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        s = 2.985
        torch.testing.assert_close(out, torch.tensor([[s, -2.0, 0.5, 1.5]], dtype=torch.float64) / s, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("objective", ["eps", "v", "x0"])
def test_eps_is_rederived_from_the_thresholded_x0(objective):
    # At t = 499 the network predicts an x0 far outside [-1, 1]. After static clipping, eps must be eq. 4 solved for
    # the clipped x0, eps = (x_t - sqrt(abar) clip(x0)) / sqrt(1 - abar), so the DDIM step stays on the line through x_t.
    x0_raw = 3.0 * _x(8)  # mostly outside [-1, 1]
    a_t, a_prev = _abar(499), _abar(249)  # steps=4 -> timesteps [999, 749, 499, 249]

    def den(x, t):
        if t[0] != 499:
            return torch.zeros_like(x)
        eps_raw = (x - math.sqrt(a_t) * x0_raw) / math.sqrt(1 - a_t)
        return {"eps": eps_raw, "x0": x0_raw, "v": math.sqrt(a_t) * eps_raw - math.sqrt(1 - a_t) * x0_raw}[objective]

    xs, _ = _trajectory(den, schedule=LINEAR, config=SamplingConfig(sampler="ddim", steps=4, threshold="static"), x_T=_x(7),
                        objective=objective)
    x_t, x0 = xs[1], x0_raw.clamp(-1, 1)
    eps = (x_t - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    torch.testing.assert_close(xs[2], math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps, rtol=1e-9, atol=1e-9)
    # Keeping the network's own eps would land elsewhere, so the check above can fail.
    stale = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * (x_t - math.sqrt(a_t) * x0_raw) / math.sqrt(1 - a_t)
    assert (xs[2] - stale).abs().max() > 0.5


def test_bad_arguments_fail_with_one_line():
    den = lambda x, t: x  # noqa: E731
    with pytest.raises(ValueError, match=r"unknown sampler 'euler'.*dpmpp2m.*ddim.*ddpm"):
        sample(den, (1, 2), schedule=COSINE, config=SamplingConfig(sampler="euler"))
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="steps must be a positive integer"):
            sample(den, (1, 2), schedule=COSINE, config=SamplingConfig(steps=bad))
    with pytest.raises(ValueError, match=r"steps must be in \[1, 1000\]"):
        sample(den, (1, 2), schedule=COSINE, config=SamplingConfig(steps=1001))
    with pytest.raises(ValueError, match=r"unknown objective 'score'.*eps.*v.*x0"):
        sample(den, (1, 2), schedule=COSINE, objective="score")
    with pytest.raises(ValueError, match=r"unknown threshold 'soft'.*dynamic.*static.*none"):
        sample(den, (1, 2), schedule=COSINE, config=SamplingConfig(threshold="soft"))
    with pytest.raises(ValueError, match="both inpaint_mask and known_x0"):
        sample(den, (1, 2), schedule=COSINE, known_x0=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="only applies to the 'ddim'"):
        make_sampler("ddpm", COSINE, eta=0.5)


def test_sampling_config_validates_once_with_one_line_errors():
    from imagen.errors import GenerationError

    for bad, needle in [(dict(guidance=-1), "guidance must be >= 0"), (dict(percentile=0.0), r"percentile must be in \(0, 1\]"),
                        (dict(aug_level=1.5), r"aug_level must be in \[0, 1\]"), (dict(strength=0.0), "strength"),
                        (dict(eta=0.5), "only applies to the 'ddim'"), (dict(n=0), "samples per prompt")]:
        with pytest.raises(GenerationError, match=needle):
            SamplingConfig(**bad)
    assert SamplingConfig(sampler="ddim", eta=0.5).eta == 0.5


def test_sampling_config_percentile_reaches_the_threshold(monkeypatch):
    import imagen.diffusion.samplers as samplers

    seen = []
    original = samplers.apply_threshold
    monkeypatch.setattr(samplers, "apply_threshold", lambda x0, mode, p: seen.append((mode, p)) or original(x0, mode, p))
    sample(lambda x, t: x, (2, 3), schedule=COSINE, config=SamplingConfig(steps=2, percentile=0.9))
    assert seen == [("dynamic", 0.9)] * 2


@pytest.mark.parametrize("field, value", [("guidance", "3"), ("guidance", float("nan")), ("eta", None), ("percentile", float("inf"))])
def test_sampling_config_refuses_what_is_not_a_finite_number(field, value):
    from imagen.errors import GenerationError

    with pytest.raises(GenerationError, match=f"{field} must be a finite number"):
        SamplingConfig(**{field: value})
