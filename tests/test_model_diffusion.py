"""common.diffusion.model, .schedule and .samplers: architecture size, shapes, schedule maths, samplers, paired
noise."""
import os

import pytest
import torch

from common.core.config import load_config
from common.diffusion.blocks import sinusoidal_table
from common.diffusion.model import build_model, count_params, stage_of
from common.diffusion.samplers import DDIMSampler, DDPMSampler, batch_generator, build_sampler, sample
from common.diffusion.schedule import NoiseSchedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke_cfg():
    return load_config(os.path.join(ROOT, "configs", "smoke.yaml"))


@pytest.fixture(scope="module")
def tiny(smoke_cfg):
    torch.manual_seed(0)
    return build_model(smoke_cfg.model, smoke_cfg.diffusion.timesteps).eval()


class ZeroModel(torch.nn.Module):
    def forward(self, x, t):
        return torch.zeros_like(x)


class ScaledModel(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x, t):
        return self.c * x


class OracleModel(torch.nn.Module):
    """Predicts exactly the noise that separates x_t from a known x0."""

    def __init__(self, schedule, x0):
        super().__init__()
        self.ab = schedule.alpha_bar.double()
        self.x0 = x0

    def forward(self, x, t):
        ab = self.ab[t].view(-1, 1, 1, 1)
        return ((x.double() - ab.sqrt() * self.x0) / (1 - ab).sqrt()).float()


def test_poster_architecture_parameter_count_and_step():
    cfg = load_config(os.path.join(ROOT, "configs", "poster.yaml"))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size)
    assert count_params(model) == 35_178_689
    assert [n for n, _ in model.named_children()] == ["shallow_conv", *[f"Layer{i}" for i in range(1, 7)],
                                                      "late_conv", "output_conv"]
    assert hasattr(model.Layer2, "attention_layer") and hasattr(model.Layer6, "attention_layer")
    assert not hasattr(model.Layer1, "attention_layer")
    assert isinstance(model.Layer4.conv, torch.nn.ConvTranspose2d) and isinstance(model.Layer3.conv, torch.nn.Conv2d)
    model.train()
    x = torch.randn(2, 1, 32, 32)
    t = torch.tensor([0, 999])
    out = model(x, t)
    assert out.shape == x.shape
    out.pow(2).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.output_conv.weight.grad.abs().sum() > 0 and model.Layer1.ResBlock1.conv1.weight.grad.abs().sum() > 0


def test_tiny_model_output_shape_and_time_dependence(tiny):
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        out = tiny(x, torch.tensor([0, 5, 99]))
        again = tiny(x, torch.tensor([0, 5, 99]))
        other_t = tiny(x, torch.tensor([50, 50, 50]))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.equal(out, again)                 # eval mode is deterministic
    assert not torch.allclose(out, other_t)        # the time embedding matters
    assert "time_table" not in tiny.state_dict()   # non-persistent buffer
    assert tiny.time_table.shape == (100, 64)


def test_sinusoidal_table_and_stage_of():
    tab = sinusoidal_table(10, 6)
    assert tab.shape == (10, 6)
    assert torch.allclose(tab[0], torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]))
    assert torch.allclose(tab[3, 0], torch.sin(torch.tensor(3.0)))
    assert stage_of("Layer3.ResBlock1.conv1.weight") == "Layer3"
    assert stage_of("Layer12.conv.bias") == "Layer12"
    assert stage_of("shallow_conv.weight") is None and stage_of("LayerX.w") is None


def test_schedule_closed_form():
    T = 1000
    s = NoiseSchedule(T, 1e-4, 0.02)
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    closed = torch.cumprod(1 - betas, 0)
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    torch.testing.assert_close(s.alpha_bar.double(), closed, rtol=1e-6, atol=0)
    torch.testing.assert_close(s.sqrt_alpha_bar.double(), closed.sqrt(), rtol=1e-6, atol=0)
    torch.testing.assert_close(s.sqrt_one_minus_alpha_bar.double(), (1 - closed).sqrt(), rtol=1e-6, atol=0)
    # also against the float32 formula people write by hand
    torch.testing.assert_close(s.alpha_bar, torch.cumprod(1 - torch.linspace(1e-4, 0.02, T), 0), rtol=1e-4, atol=1e-7)
    assert torch.all(s.alpha_bar[1:] < s.alpha_bar[:-1]) and s.alpha_bar[-1] < 1e-4
    # the endpoints of the poster's schedule: 1 - 1e-4, and prod(1 - beta_t) = 4.0358e-5 (computed by hand)
    assert s.alpha_bar[0].item() == pytest.approx(0.9999, rel=1e-7)
    assert s.alpha_bar[-1].item() == pytest.approx(4.0358e-5, rel=1e-4)


def test_q_sample_and_p_losses():
    s = NoiseSchedule(100, 1e-4, 0.02)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 50, 99])
    xt = s.q_sample(x0, t, eps)
    ab = s.alpha_bar[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, ab.sqrt() * x0 + (1 - ab).sqrt() * eps)
    assert not torch.allclose(xt[0], xt[3])
    loss = s.p_losses(ZeroModel(), x0, t, eps)
    assert loss.item() == pytest.approx(eps.pow(2).mean().item(), rel=1e-6)


def test_ddim_timesteps_and_sampler_choice(smoke_cfg):
    s = NoiseSchedule(100, 1e-4, 0.02)
    assert DDIMSampler(s, 3).timesteps == [99, 50, 0]
    assert DDIMSampler(s, 100).timesteps == list(range(99, -1, -1))
    assert DDIMSampler(s, 1).timesteps == [99]  # one step still starts from pure noise
    assert isinstance(build_sampler(smoke_cfg.sample, s), DDIMSampler)
    ddpm = DDPMSampler(s)
    assert ddpm.steps == 100 and ddpm.timesteps == list(range(99, -1, -1)) and ddpm.stochastic


def _record_model(model):
    calls = []

    class Rec(torch.nn.Module):
        def forward(self, x, t):
            calls.append((x.clone(), t.clone()))
            return model(x, t)

    return Rec(), calls


def test_ddpm_sampler_calls_model_T_times():
    T = 12
    s = NoiseSchedule(T, 1e-4, 0.02)
    rec, calls = _record_model(ZeroModel())
    out = sample(rec, DDPMSampler(s), 3, (1, 4, 4), seed=0, batch_size=3, progress=False)
    assert out.shape == (3, 1, 4, 4)
    assert len(calls) == T
    assert [int(t[0]) for _, t in calls] == list(range(T - 1, -1, -1))
    assert all(torch.all(t == t[0]) for _, t in calls)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_oracle_predictor_recovers_x0(sampler):
    s = NoiseSchedule(50, 1e-4, 0.02)
    x0 = torch.rand(2, 1, 4, 4) * 1.6 - 0.8
    smp = DDPMSampler(s) if sampler == "ddpm" else DDIMSampler(s, 5)
    out = sample(OracleModel(s, x0.double()), smp, 2, (1, 4, 4), seed=3, batch_size=2, progress=False)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


def test_ddim_same_seed_bit_identical_other_seed_differs(tiny):
    s = NoiseSchedule(100, 1e-4, 0.02)
    smp = DDIMSampler(s, 3)
    a = sample(tiny, smp, 3, (1, 32, 32), seed=0, batch_size=2, progress=False)
    b = sample(tiny, smp, 3, (1, 32, 32), seed=0, batch_size=2, progress=False)
    c = sample(tiny, smp, 3, (1, 32, 32), seed=1, batch_size=2, progress=False)
    assert a.shape == (3, 1, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.isfinite(a).all()


def test_stochastic_ddim_is_seeded_too(tiny):
    s = NoiseSchedule(100, 1e-4, 0.02)
    smp = DDIMSampler(s, 3, eta=1.0)
    det = sample(tiny, DDIMSampler(s, 3), 2, (1, 32, 32), seed=0, batch_size=2, progress=False)
    a = sample(tiny, smp, 2, (1, 32, 32), seed=0, batch_size=2, progress=False)
    b = sample(tiny, smp, 2, (1, 32, 32), seed=0, batch_size=2, progress=False)
    assert torch.equal(a, b) and not torch.allclose(a, det)


def test_zero_model_sampling_is_repeatable():
    s = NoiseSchedule(20, 1e-4, 0.02)
    for smp in (DDPMSampler(s), DDIMSampler(s, 4)):
        a = sample(ZeroModel(), smp, 5, (1, 4, 4), seed=7, batch_size=2, progress=False)
        b = sample(ZeroModel(), smp, 5, (1, 4, 4), seed=7, batch_size=2, progress=False)
        assert torch.equal(a, b)


def test_noise_depends_only_on_seed_and_batch_index():
    """Two different models get the same x_T and the same per-step noise, batch by batch."""
    s = NoiseSchedule(6, 1e-4, 0.02)
    shape = (1, 4, 4)

    def run(model, seed):
        smp = DDPMSampler(s)
        noises = []
        orig = smp.step

        def spy(eps, t, x, noise):
            noises.append(noise.clone())
            return orig(eps, t, x, noise)

        smp.step = spy
        rec, calls = _record_model(model)
        out = sample(rec, smp, 5, shape, seed=seed, batch_size=2, progress=False)
        return out, noises, calls

    out_a, noise_a, calls_a = run(ZeroModel(), 11)
    out_b, noise_b, calls_b = run(ScaledModel(0.5), 11)
    assert len(noise_a) == len(noise_b) == 6 * 3  # 3 batches (2, 2, 1) x T steps
    assert all(torch.equal(u, v) for u, v in zip(noise_a, noise_b, strict=True))
    assert not torch.equal(out_a, out_b)  # the models do differ
    # x_T of batch b is the first draw of batch_generator(seed, b)
    for b, m in enumerate((2, 2, 1)):
        x_T = torch.randn((m, *shape), generator=batch_generator(11, b))
        assert torch.equal(calls_a[6 * b][0], x_T) and torch.equal(calls_b[6 * b][0], x_T)
    # the first batch does not depend on how many images follow it
    single = sample(ZeroModel(), DDPMSampler(s), 2, shape, seed=11, batch_size=2, progress=False)
    assert torch.equal(single, out_a[:2])
    # another seed, other noise
    _, noise_c, _ = run(ZeroModel(), 12)
    assert not torch.equal(noise_a[0], noise_c[0])
    assert not torch.equal(noise_a[0], noise_a[6])  # and batches differ from each other


def test_unfused_attention_matches_fused():
    """The vmap-friendly attention path used by Fisher computes the same function as SDPA."""
    from common.diffusion.model import unfused_attention

    cfg = load_config(os.path.join(ROOT, "configs", "smoke.yaml"))
    model = build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size).eval()
    x, t = torch.randn(3, 1, 32, 32), torch.tensor([0, 5, 99])
    with torch.no_grad():
        fused = model(x, t)
        with unfused_attention(model):
            plain = model(x, t)
    assert torch.allclose(fused, plain, atol=1e-5)
    assert all(m.fused for m in model.modules() if hasattr(m, "fused"))  # restored


def test_noise_rows_give_a_smaller_batch_the_images_a_full_batch_begins_with():
    """A stochastic sampler draws each step's noise for its batch's rows: 3 images sampled alone were other
    images than the first 3 of a batch of 8 (sample.py --n below the evaluation's batch); noise_rows fixes that."""

    class Elementwise(torch.nn.Module):  # no cross-image arithmetic: equality is exact
        def forward(self, x, t):
            return 0.1 * x

    sampler = DDIMSampler(NoiseSchedule(100, 1e-4, 0.02), 4, eta=1.0)
    assert sampler.stochastic
    full = sample(Elementwise(), sampler, 8, (1, 4, 4), 7, 8, progress=False)
    alone = sample(Elementwise(), sampler, 3, (1, 4, 4), 7, 3, progress=False)
    assert not torch.equal(alone, full[:3])
    assert torch.equal(sample(Elementwise(), sampler, 3, (1, 4, 4), 7, 3, progress=False, noise_rows=8), full[:3])
    assert torch.equal(sample(Elementwise(), sampler, 8, (1, 4, 4), 7, 8, progress=False, noise_rows=8), full)
    # an evaluation of 5 images (batch size 8) drew 5 rows per step, one of 11 drew 8 then 3: noise_of says so
    five, eleven = (sample(Elementwise(), sampler, n, (1, 4, 4), 7, min(n, 8), progress=False) for n in (5, 11))
    assert not torch.equal(sample(Elementwise(), sampler, 3, (1, 4, 4), 7, 3, progress=False, noise_rows=8), five[:3])
    assert torch.equal(sample(Elementwise(), sampler, 3, (1, 4, 4), 7, 3, progress=False, noise_rows=8, noise_of=5),
                       five[:3])
    assert torch.equal(sample(Elementwise(), sampler, 11, (1, 4, 4), 7, 8, progress=False, noise_rows=8,
                              noise_of=11), eleven)
