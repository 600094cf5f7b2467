"""Progressive distillation (`imagen distill --steps N`, Salimans & Ho 2022): the target is exact (one student DDIM
step lands where the teacher's two do), the student samples on the grid it was distilled on, and the command halves
the steps phase by phase into a run usable after every phase."""

import json

import pytest
import torch

from cli_helpers import one_line_error, run_cli as run
from imagen.diffusion import (DDIMSampler, NoiseSchedule, model_output_to_x0_eps, progressive_distillation_loss,
                              progressive_distillation_target, progressive_timesteps, spaced_timesteps)
from imagen.diffusion.process import min_snr_weight


def _teacher(x_t, t, text_embed):
    # A fixed stand-in network: affine in x_t, varying with t and the condition, large enough to be thresholded.
    return 1.7 * x_t + (t.float() / 1000)[:, None, None, None] + text_embed[:, :, None, None]


def _teacher_two_steps_with_the_sampler(x_t, grid, i, cond, schedule, objective, threshold):
    """The teacher's steps grid[2i] -> grid[2i+1] -> grid[2i+2], one sample at a time, as `sample` takes them."""
    ddim, x = DDIMSampler(schedule), x_t
    for t, t_prev in ((grid[2 * i], grid[2 * i + 1]), (grid[2 * i + 1], grid[2 * i + 2])):
        tb = torch.tensor([t])
        pred_x0, eps = model_output_to_x0_eps(schedule, _teacher(x, tb, **cond), x, tb, objective, threshold, 0.995)
        x = ddim.step(pred_x0, eps, t, t_prev, x)
    return x


@pytest.mark.parametrize("objective", ["v", "eps", "x0"])
@pytest.mark.parametrize("threshold", ["dynamic", "static", "none"])
def test_one_student_step_with_the_target_lands_on_the_teachers_two(objective, threshold):
    schedule = NoiseSchedule.from_name("cosine", 1000)
    N = 4
    grid, student_grid = progressive_timesteps(1000, 2 * N), progressive_timesteps(1000, N)
    assert grid == spaced_timesteps(1000, 2 * N) + [-1] and student_grid == grid[::2]
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(N, 3, 4, 4, generator=g, dtype=torch.float64)
    cond = {"text_embed": torch.randn(N, 3, generator=g, dtype=torch.float64) * 0.3}
    step = torch.arange(N)  # every student step, the last one onto clean data included
    t, t_mid, t_next = (torch.tensor(grid)[2 * step + k] for k in range(3))
    target = progressive_distillation_target(_teacher, x_t, t, t_mid, t_next, cond, schedule=schedule,
                                             objective=objective, threshold=threshold, percentile=0.995)
    for i in range(N):
        want = _teacher_two_steps_with_the_sampler(x_t[i:i + 1], grid, i, {"text_embed": cond["text_embed"][i:i + 1]},
                                                   schedule, objective, threshold)
        tb = torch.tensor([student_grid[i]])
        pred_x0, eps = model_output_to_x0_eps(schedule, target[i:i + 1], x_t[i:i + 1], tb, objective, "none")
        got = DDIMSampler(schedule).step(pred_x0, eps, student_grid[i], student_grid[i + 1], x_t[i:i + 1])
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        if i == N - 1:  # the last step lands on clean data: the target's x0 is the teacher's result itself
            torch.testing.assert_close(pred_x0, want, rtol=1e-9, atol=1e-9)


def test_the_loss_is_the_truncated_snr_weighted_error_against_the_target():
    schedule = NoiseSchedule.from_name("cosine", 1000)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 3, 4, 4, generator=g), torch.randn(3, 3, 4, 4, generator=g)
    cond = {"text_embed": torch.randn(3, 3, generator=g)}
    step = torch.tensor([0, 2, 3])

    def student(x_t, t, text_embed):
        return 0.2 * x_t

    loss = progressive_distillation_loss(student, _teacher, x0, step, cond, steps=4, schedule=schedule, objective="v",
                                         threshold="dynamic", percentile=0.995, noise=noise)
    grid = torch.tensor(progressive_timesteps(1000, 8))
    t = grid[2 * step]
    assert t.tolist() == [999, 499, 249]
    x_t = schedule.sqrt_alphas_cumprod[t][:, None, None, None].float() * x0 + \
        schedule.sqrt_one_minus_alphas_cumprod[t][:, None, None, None].float() * noise
    target = progressive_distillation_target(_teacher, x_t, t, grid[2 * step + 1], grid[2 * step + 2], cond,
                                             schedule=schedule, objective="v", threshold="dynamic", percentile=0.995)
    snr = schedule.log_snr[t].exp()
    weight = (snr.clamp(min=1) / (snr + 1)).float()  # max(SNR, 1) in x0 terms, as a v-loss weight
    torch.testing.assert_close(weight, min_snr_weight(snr, None, "v", 1.0).float())
    per_sample = ((0.2 * x_t - target) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(loss, (per_sample * weight).mean(), rtol=1e-5, atol=0)
