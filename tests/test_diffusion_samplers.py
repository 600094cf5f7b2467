"""Samplers against the published update rules (hand-computed in float math) and against known distributions."""

import math

import pytest
import torch

from imagen.diffusion import (
    SAMPLERS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverPP2MSampler,
    DPMSolverPP3MSampler,
    NoiseSchedule,
    SamplingConfig,
    UniPCSampler,
    make_sampler,
    sample,
    sample_generators,
)
from imagen.diffusion.samplers import clipped_num_timesteps


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
    # Before the first step the known region is q_sample(known_x0, first timestep) with the generator's first draw.
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    a, s = COSINE.alpha_sigma(make_sampler(sampler, COSINE).set_timesteps(8)[0])
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


def test_stage_steps_give_named_stages_their_own_count():
    from imagen.errors import GenerationError

    config = SamplingConfig(steps=25, stage_steps={"sr1": 12, "base": 8})
    assert config.stage_steps == (("base", 8), ("sr1", 12))  # sorted pairs: the same request, the same (hashable) key
    assert hash(config) == hash(SamplingConfig(steps=25, stage_steps=[("base", 8), ("sr1", 12)]))
    assert config.for_stage("base").steps == 8 and config.for_stage("sr1").steps == 12
    assert config.for_stage("sr2").steps == 25 and config.for_stage("sr2") is config
    assert config.for_stage("base").stage_steps == ()  # what `sample` gets is one plain count
    for bad, needle in [({"base": 0}, "steps of stage 'base' must be a positive integer, got 0"),
                        ({"base": 2.5}, "got 2.5"), ({"base": True}, "got True"), ({"": 3}, "non-empty string"),
                        ([("base", 3), ("base", 4)], "names a stage twice"), (8, "must map stage names to step counts")]:
        with pytest.raises(GenerationError, match=needle):
            SamplingConfig(stage_steps=bad)


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


# ---------------------------------------------------------------------------------------------------
# DPM-Solver++(3M) and UniPC: the published updates by hand, then convergence to the exact probability-flow ODE
# solution for Gaussian data, where everything is closed form.


def test_lambda_clipping_skips_the_cosine_tail_only():
    # lambda = log(alpha / sigma) >= -5.1 holds up to t = 995 on the cosine schedule, everywhere on the linear one.
    assert COSINE.half_log_snr(995) >= -5.1 > COSINE.half_log_snr(996)
    assert clipped_num_timesteps(COSINE) == 996 and clipped_num_timesteps(LINEAR) == 1000
    for name in ("dpmpp3m", "unipc"):
        assert make_sampler(name, COSINE).set_timesteps(4) == [995, 746, 497, 248]  # trailing over [0, 995]
        assert make_sampler(name, LINEAR).set_timesteps(4) == [999, 749, 499, 249]
        with pytest.raises(ValueError, match=r"steps must be in \[1, 996\] for this sampler.*got 1000"):
            make_sampler(name, COSINE).set_timesteps(1000)
    assert make_sampler("dpmpp2m", COSINE).set_timesteps(4)[0] == 999  # the others keep starting at T-1


def _lam(t):
    return 0.5 * math.log(_abar(t) / (1 - _abar(t)))


def test_dpmpp3m_matches_the_third_order_multistep_update():
    f = lambda x, t: 0.8 * torch.tanh(x) + 1e-4 * t.double()[:, None, None]  # noqa: E731  a known x0(x_t, t)
    x_T = _x(4)
    xs, out = _trajectory(f, schedule=LINEAR, config=SamplingConfig(sampler="dpmpp3m", steps=5, threshold="none"),
                          x_T=x_T, objective="x0")
    ts = [999, 799, 599, 399, 199]
    a = lambda t: math.sqrt(_abar(t))  # noqa: E731
    s = lambda t: math.sqrt(1 - _abar(t))  # noqa: E731
    t0 = lambda t: torch.full((2,), t)  # noqa: E731
    m0 = f(x_T, t0(ts[0]))
    h = _lam(ts[1]) - _lam(ts[0])
    x1 = s(ts[1]) / s(ts[0]) * x_T - a(ts[1]) * math.expm1(-h) * m0  # first order: DDIM
    torch.testing.assert_close(xs[0], x1, rtol=1e-9, atol=1e-9)
    m1 = f(x1, t0(ts[1]))
    h, h0 = _lam(ts[2]) - _lam(ts[1]), _lam(ts[1]) - _lam(ts[0])
    phi1 = math.expm1(-h)
    phi2 = phi1 / h + 1
    x2 = s(ts[2]) / s(ts[1]) * x1 - a(ts[2]) * phi1 * m1 + a(ts[2]) * phi2 * (m1 - m0) / (h0 / h)  # second order
    torch.testing.assert_close(xs[1], x2, rtol=1e-9, atol=1e-9)
    # Third order, in the notation of DPM-Solver++'s multistep code (r0, r1, D1, D2), with D2 weighted 2 phi_3:
    # D2 = h^2 x0''/2 and the Taylor term is alpha_t e^{-h} int_0^h e^u u^2/2 du x0'' = -2 alpha_t phi_3 D2.
    m2 = f(x2, t0(ts[2]))
    h, h0, h1 = _lam(ts[3]) - _lam(ts[2]), _lam(ts[2]) - _lam(ts[1]), _lam(ts[1]) - _lam(ts[0])
    r0, r1 = h0 / h, h1 / h
    D1_0, D1_1 = (m2 - m1) / r0, (m1 - m0) / r1
    D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
    D2 = (D1_0 - D1_1) / (r0 + r1)
    phi1 = math.expm1(-h)
    phi2 = phi1 / h + 1
    phi3 = phi2 / h - 0.5
    x3 = s(ts[3]) / s(ts[2]) * x2 - a(ts[3]) * phi1 * m2 + a(ts[3]) * phi2 * D1 - 2 * a(ts[3]) * phi3 * D2
    torch.testing.assert_close(xs[2], x3, rtol=1e-9, atol=1e-9)
    # Into the last timestep: second order again (lower order at the end); then onto sigma = 0: x0 itself.
    m3 = f(x3, t0(ts[3]))
    h, h0 = _lam(ts[4]) - _lam(ts[3]), _lam(ts[3]) - _lam(ts[2])
    phi1 = math.expm1(-h)
    x4 = s(ts[4]) / s(ts[3]) * x3 - a(ts[4]) * phi1 * m3 + a(ts[4]) * (phi1 / h + 1) * (m3 - m2) / (h0 / h)
    torch.testing.assert_close(xs[3], x4, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out, f(x4, t0(ts[4])), rtol=1e-12, atol=1e-12)


def test_unipc_matches_unip2_with_unic_bh2():
    f = lambda x, t: 0.8 * torch.tanh(x) + 1e-4 * t.double()[:, None, None]  # noqa: E731
    x_T = _x(5)
    den = Recorder(f)
    xs, out = _trajectory(den, schedule=LINEAR, config=SamplingConfig(sampler="unipc", steps=4, threshold="none"),
                          x_T=x_T, objective="x0")
    ts = [999, 749, 499, 249]
    a = lambda t: math.sqrt(_abar(t))  # noqa: E731
    s = lambda t: math.sqrt(1 - _abar(t))  # noqa: E731
    t0 = lambda t: torch.full((2,), t)  # noqa: E731

    def rhos_c(h, r):
        # bh2: B = e^{-h} - 1; b_k = k! g_k / B with g_1 = (e^{-h}-1)/(-h) - 1, g_2 = g_1/(-h) - 1/2
        B = math.expm1(-h)
        g1 = B / -h - 1
        g2 = g1 / -h - 0.5
        return torch.linalg.solve(torch.tensor([[1.0, 1.0], [r, 1.0]], dtype=torch.float64),
                                  torch.tensor([g1 / B, 2 * g2 / B], dtype=torch.float64)).tolist()

    # Step 1: UniP-1 (DDIM) to the predicted point, where the model is next evaluated.
    m0 = f(x_T, t0(ts[0]))
    h1 = _lam(ts[1]) - _lam(ts[0])
    x1 = s(ts[1]) / s(ts[0]) * x_T - a(ts[1]) * math.expm1(-h1) * m0
    torch.testing.assert_close(xs[0], x1, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(den.calls[1][0], x1, rtol=1e-9, atol=1e-9)
    # Step 2: UniC-1 corrects x1 with m1 = x0(x1) (rho = 1/2), then UniP-2 from the corrected point.
    m1 = f(x1, t0(ts[1]))
    B1 = math.expm1(-h1)
    x1c = s(ts[1]) / s(ts[0]) * x_T - a(ts[1]) * B1 * m0 - a(ts[1]) * B1 * 0.5 * (m1 - m0)
    h2 = _lam(ts[2]) - _lam(ts[1])
    r = (_lam(ts[0]) - _lam(ts[1])) / h2
    B2 = math.expm1(-h2)
    x2 = s(ts[2]) / s(ts[1]) * x1c - a(ts[2]) * B2 * m1 - a(ts[2]) * B2 * 0.5 * (m0 - m1) / r
    torch.testing.assert_close(xs[1], x2, rtol=1e-9, atol=1e-9)
    # Step 3: UniC-2 corrects x2 (rhos from the 2x2 order conditions), then UniP-2 into the last timestep.
    m2 = f(x2, t0(ts[2]))
    rho0, rho1 = rhos_c(h2, r)
    x2c = s(ts[2]) / s(ts[1]) * x1c - a(ts[2]) * B2 * m1 - a(ts[2]) * B2 * (rho0 * (m0 - m1) / r + rho1 * (m2 - m1))
    h3 = _lam(ts[3]) - _lam(ts[2])
    r = (_lam(ts[1]) - _lam(ts[2])) / h3
    B3 = math.expm1(-h3)
    x3 = s(ts[3]) / s(ts[2]) * x2c - a(ts[3]) * B3 * m2 - a(ts[3]) * B3 * 0.5 * (m1 - m2) / r
    torch.testing.assert_close(xs[2], x3, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out, f(x3, t0(ts[3])), rtol=1e-12, atol=1e-12)  # first order onto sigma = 0
    assert len(den.calls) == 4  # the corrector costs no network call


# x0 ~ N(mu, sd^2) per coordinate (sd from 0.1 to 1). Then x_t = alpha x0 + sigma eps is Gaussian, the ideal
# denoiser is E[x0 | x_t] = mu + alpha sd^2 (x_t - alpha mu) / (alpha^2 sd^2 + sigma^2), and the probability-flow ODE
# keeps z = (x_t - alpha mu) / sqrt(alpha^2 sd^2 + sigma^2) constant: its exact solution from x at t ends at mu + sd z.
_MU = torch.linspace(-0.5, 0.5, 32, dtype=torch.float64)
_SD = torch.logspace(-1, 0, 32, dtype=torch.float64)
_X_T = torch.randn(128, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _gaussian_x0(x_t, t):
    a = COSINE.sqrt_alphas_cumprod[t].reshape(-1, 1).to(x_t)
    s = COSINE.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1).to(x_t)
    return _MU + a * _SD**2 / (a**2 * _SD**2 + s**2) * (x_t - a * _MU)


def _exact_ode(x, t_from, t_to=-1):
    """The probability-flow ODE's solution at t_to from x at t_from, for the Gaussian data above."""
    a, s = COSINE.alpha_sigma(t_from)
    z = (x - a * _MU) / (a**2 * _SD**2 + s**2).sqrt()
    a, s = COSINE.alpha_sigma(t_to)
    return a * _MU + (a**2 * _SD**2 + s**2).sqrt() * z


def _rmse(a, b):
    return (a - b).pow(2).mean().sqrt().item()


def _sample_error(sampler, steps):
    """RMSE of `sample` against the exact ODE solution from the same x_T at the sampler's first timestep."""
    out = sample(_gaussian_x0, None, schedule=COSINE, config=SamplingConfig(sampler=sampler, steps=steps, threshold="none"),
                 x_T=_X_T, objective="x0")
    return _rmse(out, _exact_ode(_X_T, make_sampler(sampler, COSINE).set_timesteps(steps)[0]))


ODE_SAMPLERS = ["ddim", "dpmpp2m", "dpmpp3m", "unipc"]


@pytest.mark.parametrize("sampler", ODE_SAMPLERS)
def test_samples_approach_the_exact_ode_solution(sampler):
    errors = [_sample_error(sampler, n) for n in (8, 16, 32, 64)]
    assert errors == sorted(errors, reverse=True)
    # The last jump, from t = T/steps - 1 straight to clean data, returns E[x0 | x_t]; its error shrinks like
    # sigma^2 there, i.e. like 1/steps, so end to end every sampler converges at first order in the step count.
    assert errors[-1] < (0.02 if sampler == "ddim" else 0.006)


@pytest.mark.parametrize("steps", [6, 8])
def test_third_order_samplers_beat_dpmpp2m_at_few_steps(steps):
    # Measured at 8 steps: DDIM 0.087, 2M 0.054, 3M 0.049, UniPC 0.049. Most of it is the last jump to clean data
    # (0.050 from the exact point at t = 124), the same for every sampler, so the margin is small but certain.
    e2m, e3m, euni, eddim = (_sample_error(s, steps) for s in ("dpmpp2m", "dpmpp3m", "unipc", "ddim"))
    assert e3m < 0.95 * e2m and euni < 0.95 * e2m and e2m < 0.75 * eddim


def _warm_solve(solver, ts, warm):
    """Run `solver` over the timesteps ts from _X_T, on the exact trajectory for the first `warm` evaluations."""
    solver.timesteps = [-1]  # no lower-order step at the end: this measures the update itself
    x = _X_T
    for i, (t, t_prev) in enumerate(zip(ts, ts[1:])):
        if i < warm:
            x = _exact_ode(_X_T, ts[0], t)
        pred_x0 = _gaussian_x0(x, torch.tensor([t]))
        a, s = COSINE.alpha_sigma(t)
        x = solver.step(pred_x0, (x - a * pred_x0) / s, t, t_prev, x)
    return _rmse(x, _exact_ode(_X_T, ts[0], ts[-1]))


class _HalfWeightD2(DPMSolverPP3MSampler):
    """DPM-Solver++(3M) as the authors' code writes its third-order step: D2 weighted by phi_3, not 2 phi_3."""

    def step(self, pred_x0, eps, t, t_prev, x_t, generator=None):
        if len(self._x0s) < 2 or t_prev < 0 or t_prev == self.timesteps[-1]:  # steps of first or second order
            return super().step(pred_x0, eps, t, t_prev, x_t, generator)
        self._remember(t, pred_x0, keep=3)
        (l2, l1, l0), (m2, m1, m0) = self._lambdas, self._x0s
        alpha_t, sigma_t = self.schedule.alpha_sigma(t_prev)
        h = self.schedule.half_log_snr(t_prev) - l0
        r0, r1 = (l0 - l1) / h, (l1 - l2) / h
        D1_0, D1_1 = (m0 - m1) / r0, (m1 - m2) / r1
        D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
        D2 = (D1_0 - D1_1) / (r0 + r1)
        phi1 = math.expm1(-h)
        phi2 = phi1 / h + 1
        phi3 = phi2 / h - 0.5
        return sigma_t / self.schedule.alpha_sigma(t)[1] * x_t - alpha_t * phi1 * m0 + alpha_t * phi2 * D1 - alpha_t * phi3 * D2


@pytest.mark.parametrize("solver, warm, low, high", [
    (DDIMSampler(COSINE), 0, 0.9, 1.1),
    (DPMSolverPP2MSampler(COSINE), 0, 1.85, 2.2),
    (DPMSolverPP3MSampler(COSINE), 2, 2.7, 3.3),  # started on the exact trajectory: its first steps are lower order
    (UniPCSampler(COSINE), 0, 2.6, 3.3),  # UniC already makes the first step second order
    (_HalfWeightD2(COSINE), 2, 1.5, 2.5),  # the half-weight second-derivative term: second order
], ids=["ddim", "dpmpp2m", "dpmpp3m", "unipc", "dpmpp3m-half-d2"])
def test_empirical_order_when_steps_double(solver, warm, low, high):
    # Timesteps evenly spaced from 960 to 64: the step in lambda then shrinks everywhere as steps double (the
    # trailing spacing's last step to t = T/steps - 1 does not, see test_samples_approach_the_exact_ode_solution).
    errors = []
    for n in (64, 128):
        solver.reset()
        errors.append(_warm_solve(solver, [960 - i * 896 // n for i in range(n + 1)], warm))
    assert low < math.log2(errors[0] / errors[1]) < high


@pytest.mark.parametrize("sampler", ["dpmpp3m", "unipc"])
def test_batched_equals_one_at_a_time_and_seeded(sampler):
    den = lambda x, t: 0.9 * torch.tanh(2 * x) + 0.01 * torch.cos(t.double())[:, None]  # noqa: E731  nonlinear, elementwise
    config = SamplingConfig(sampler=sampler, steps=6)  # dynamic thresholding: a per-sample percentile
    gens = lambda: sample_generators(3, range(4), None)  # noqa: E731
    batched = sample(den, (4, 5), schedule=COSINE, config=config, objective="x0", generator=gens(), dtype=torch.float64)
    for k in range(4):
        alone = sample(den, (1, 5), schedule=COSINE, config=config, objective="x0", generator=sample_generators(3, [k], None),
                       dtype=torch.float64)
        torch.testing.assert_close(batched[k:k + 1], alone, rtol=0, atol=1e-14)
    again = sample(den, (4, 5), schedule=COSINE, config=config, objective="x0", generator=gens(), dtype=torch.float64)
    assert torch.equal(batched, again)
    other = sample(den, (4, 5), schedule=COSINE, config=config, objective="x0", generator=sample_generators(4, range(4), None),
                   dtype=torch.float64)
    assert (other - batched).abs().max() > 0.1
