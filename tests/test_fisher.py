"""common.importance.fisher: vmap per-sample gradients vs a loop, the Fisher artifact, summaries, checkpoint binding."""
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from common.core.config import load_config
from common.diffusion.model import build_model
from common.diffusion.schedule import NoiseSchedule
from common.importance.fisher import (
    FisherMismatchError,
    compute_fisher,
    draw_samples,
    load_fisher,
    per_sample_sq_grads,
    per_sample_sq_grads_loop,
    save_fisher,
    summarize,
)
from common.quant.eligibility import eligible_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(os.path.join(ROOT, "configs", "smoke.yaml"))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size).eval()
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    pool = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    return cfg, model, schedule, pool


def fcfg(**kw):
    base = dict(n_samples=4, timesteps=None, chunk_size=3, seed=0, eligible="poster", profile_buckets=2,
                timestep_sampling="uniform", bootstrap=0)
    base.update(kw)
    return SimpleNamespace(**base)


def test_eligible_rules(setup):
    _, model, _, _ = setup
    poster = eligible_names(model, "poster")
    all_w = eligible_names(model, "all_weights")
    every = eligible_names(model, "all")
    assert len(poster) == 34
    assert all(n.startswith("Layer") and n.endswith(".weight") for n in poster)
    assert "Layer2.attention_layer.proj1.weight" in poster and "Layer4.conv.weight" in poster
    assert not any("gnorm" in n for n in poster)
    assert set(all_w) - set(poster) == {"shallow_conv.weight", "late_conv.weight", "output_conv.weight"}
    assert every == [n for n, _ in model.named_parameters()]
    assert set(poster) < set(all_w) < set(every)
    with pytest.raises(ValueError, match="eligible rule"):
        eligible_names(model, "biases")


def assert_same_sq_grads(fast: dict, slow: dict, layers: int, reduction: int):
    """Per sample and tensor, the two computations of g^2 agree normwise within what float32 lets them differ:
    each gradient entry is a sum of at most ``reduction`` products, summed in another order by vmap's batched
    kernels, the errors passed on through ``layers`` layers of the backward pass and doubled by squaring. The
    worst-case bound (n u per sum) is ~1e-2 here, too loose to see a 1% error; rounding errors of independent
    sign grow as sqrt(n) u instead, exceeding lambda sqrt(n) u with probability ~exp(-lambda^2 / 2) (Higham & Mary,
    probabilistic rounding error analysis, 2019): lambda = 4. A wrong sample, a missing term or a batch mean
    broadcast is off by O(1)."""
    tol = 2 * 4 * (layers * reduction) ** 0.5 * torch.finfo(torch.float32).eps / 2
    for n in slow:
        assert fast[n].shape == slow[n].shape, n
        diff = (fast[n] - slow[n]).flatten(1).norm(dim=1)
        size = slow[n].flatten(1).norm(dim=1)
        worst = float((diff / size.clamp_min(1e-30)).max())
        assert bool((diff <= tol * size).all()), f"{n}: relative error {worst:.3g} > {tol:.3g}"


def test_vmap_matches_autograd_loop(setup):
    _, model, schedule, pool = setup
    names = eligible_names(model, "all")  # weights, biases and GroupNorm affine alike
    x0, t, eps = draw_samples(pool, 3, schedule.timesteps, seed=1)
    fast = per_sample_sq_grads(model, schedule, names, x0, t, eps)
    slow = per_sample_sq_grads_loop(model, schedule, names, x0, t, eps)
    assert fast.keys() == slow.keys() == set(names)
    params = dict(model.named_parameters())
    for n in names:
        assert fast[n].shape == (3, *params[n].shape)
    assert_same_sq_grads(fast, slow, layers=len(names), reduction=32 * 32)  # a conv's weight gradient: H x W terms
    # per-sample: the three samples have different gradients (not a batch-mean broadcast)
    w = fast["Layer1.ResBlock1.conv1.weight"]
    assert not torch.allclose(w[0], w[1])


def test_draw_samples_fixed_timesteps(setup):
    _, _, _, pool = setup
    x0, t, eps = draw_samples(pool, 5, 100, seed=0, fixed_t=[3, 70])
    assert t.tolist() == [3, 70, 3, 70, 3]
    assert x0.shape == eps.shape == (5, 1, 32, 32)
    a = draw_samples(pool, 5, 100, seed=4)
    b = draw_samples(pool, 5, 100, seed=4)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_compute_fisher_is_the_mean_of_squared_per_sample_grads(setup):
    _, model, schedule, pool = setup
    cfg = fcfg(n_samples=4, chunk_size=3)  # chunks of 3 + 1
    art = compute_fisher(model, schedule, pool, cfg, progress=False)
    names = eligible_names(model, "poster")
    params = dict(model.named_parameters())
    assert list(art["diag"]) == names
    x0, t, eps = draw_samples(pool, 4, schedule.timesteps, seed=0)  # fcfg: uniform timesteps
    ref = per_sample_sq_grads_loop(model, schedule, names, x0, t, eps)
    for n in names:
        d = art["diag"][n]
        assert d.shape == params[n].shape and d.dtype == torch.float32
        assert (d >= 0).all() and d.sum() > 0
        assert_same_sq_grads({n: d[None]}, {n: ref[n].mean(0)[None]}, layers=len(names), reduction=32 * 32)
        assert art["per_tensor"][n] == pytest.approx(float(d.mean()), rel=1e-6)
    meta = art["meta"]
    assert meta["n_samples"] == 4 and meta["timesteps"] == t.tolist() and meta["eligible_rule"] == "poster"
    assert sum(meta["bucket_counts"]) == 4 and len(meta["bucket_counts"]) == 2
    # the timestep profile is a per-bucket split of the same mean
    counts = dict(zip(["t0000-0049", "t0050-0099"], meta["bucket_counts"], strict=True))
    for n in names:
        avg = sum(counts[k] * prof[n] for k, prof in art["timestep_profile"].items()) / 4
        assert avg == pytest.approx(art["per_tensor"][n], rel=1e-5)
    assert set(art["timestep_profile"]) == {k for k, c in counts.items() if c}


def test_compute_fisher_seeded(setup):
    _, model, schedule, pool = setup
    a = compute_fisher(model, schedule, pool, fcfg(n_samples=2, seed=0), progress=False)
    b = compute_fisher(model, schedule, pool, fcfg(n_samples=2, seed=0, chunk_size=1), progress=False)
    c = compute_fisher(model, schedule, pool, fcfg(n_samples=2, seed=1), progress=False)
    again = compute_fisher(model, schedule, pool, fcfg(n_samples=2, seed=0), progress=False)
    for n in a["diag"]:
        assert torch.equal(a["diag"][n], again["diag"][n])  # same seed, same settings: bit-identical
        # chunking only changes float summation order
        torch.testing.assert_close(a["diag"][n], b["diag"][n], rtol=1e-3, atol=1e-10)
    assert any(not torch.allclose(a["diag"][n], c["diag"][n]) for n in a["diag"])
    assert a["meta"]["seed"] == 0 and c["meta"]["seed"] == 1


def test_compute_fisher_fixed_timestep_list(setup):
    _, model, schedule, pool = setup
    art = compute_fisher(model, schedule, pool, fcfg(n_samples=2, timesteps=[10, 90]), progress=False)
    assert art["meta"]["timesteps"] == [10, 90] and art["meta"]["timestep_rule"] == "fixed list"
    assert art["meta"]["bucket_counts"] == [1, 1]


def test_unreachable_parameter_gets_zero_fisher(setup):
    cfg, _, schedule, pool = setup
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size)
    model.Layer3.unused = nn.Linear(4, 4)  # inside a stage, so eligible, but never called by forward()
    assert "Layer3.unused.weight" in eligible_names(model, "poster")
    art = compute_fisher(model, schedule, pool, fcfg(n_samples=2, chunk_size=2), progress=False)
    assert torch.equal(art["diag"]["Layer3.unused.weight"], torch.zeros(4, 4))
    assert art["per_tensor"]["Layer3.unused.weight"] == 0.0
    assert art["per_tensor"]["Layer3.conv.weight"] > 0


def test_summarize_per_layer_is_the_element_mean():
    diag = {
        "Layer1.a.weight": torch.tensor([1.0, 2.0, 3.0]),
        "Layer1.b.weight": torch.tensor([[10.0]]),
        "Layer2.c.weight": torch.tensor([4.0, 4.0]),
        "Layer10.d.weight": torch.tensor([0.5]),
        "shallow_conv.weight": torch.tensor([7.0, 9.0]),
    }
    s = summarize(diag)
    assert s["per_tensor"] == {"Layer1.a.weight": 2.0, "Layer1.b.weight": 10.0, "Layer2.c.weight": 4.0,
                               "Layer10.d.weight": 0.5, "shallow_conv.weight": 8.0}
    assert s["per_layer"]["Layer1"] == pytest.approx(16.0 / 4)  # element mean, not mean of tensor means (6)
    assert s["per_layer"]["Layer2"] == 4.0 and s["per_layer"]["other"] == 8.0
    assert list(s["per_layer"]) == ["Layer1", "Layer2", "Layer10", "other"]  # numeric order, other last
    assert s["per_layer_total"]["Layer1"] == 16.0
    assert s["per_layer_numel"] == {"Layer1": 4, "Layer2": 2, "Layer10": 1, "other": 2}


def test_save_and_load_fisher_are_bound_to_the_checkpoint(tmp_path):
    ck, other = tmp_path / "checkpoint.pt", tmp_path / "other.pt"
    ck.write_bytes(b"weights v1")
    other.write_bytes(b"weights v2")
    art = {"diag": {"Layer1.w": torch.arange(3.0)}, "per_tensor": {"Layer1.w": 1.0}, "meta": {"seed": 0}}
    path = str(tmp_path / "fisher.pt")
    save_fisher(art, path, str(ck))
    loaded = load_fisher(path, str(ck))
    assert torch.equal(loaded["diag"]["Layer1.w"], torch.arange(3.0))
    assert loaded["per_tensor"] == {"Layer1.w": 1.0}
    assert loaded["meta"]["checkpoint"] == os.path.abspath(ck) and len(loaded["meta"]["checkpoint_sha256"]) == 64
    with pytest.raises(FisherMismatchError, match="recompute"):
        load_fisher(path, str(other))
    ck.write_bytes(b"weights v1 retrained")  # same path, new content
    with pytest.raises(FisherMismatchError):
        load_fisher(path, str(ck))
    with pytest.raises(FileNotFoundError):
        load_fisher(str(tmp_path / "missing.pt"), str(ck))


@pytest.mark.parametrize("T, K", [(1000, 10), (10, 3), (7, 7), (100, 6)])
def test_bucket_labels_cover_exactly_their_timesteps(T, K):
    from common.diffusion.schedule import bucket_edges

    t = torch.arange(T)
    b = t * K // T
    assert bucket_edges(T, K) == [(int(t[b == k].min()), int(t[b == k].max())) for k in range(K)]


def test_stratified_draw_has_equal_bucket_counts_and_weights_with_mean_one():
    from common.diffusion.schedule import bucket_edges
    from common.importance.fisher import sample_weights

    pool = torch.zeros(3, 1, 4, 4)
    for T, K, n in [(1000, 10, 512), (100, 6, 13), (7, 3, 7)]:
        _, t, _ = draw_samples(pool, n, T, seed=0, strata=K)
        b = t * K // T
        counts = torch.bincount(b, minlength=K)
        assert counts.max() - counts.min() <= 1 and counts.sum() == n
        for k, (lo, hi) in enumerate(bucket_edges(T, K)):
            assert ((t[b == k] >= lo) & (t[b == k] <= hi)).all()
        w = sample_weights(t, T, K)
        # sum over each bucket of w / n = the bucket's share of 0..T-1: an unbiased E_t under uniform t
        widths = torch.tensor([hi - lo + 1 for lo, hi in bucket_edges(T, K)], dtype=torch.float64)
        torch.testing.assert_close(torch.zeros(K, dtype=torch.float64).index_add_(0, b, w) / n, widths / T)
    assert torch.equal(sample_weights(torch.tensor([1, 5]), 10, None), torch.ones(2, dtype=torch.float64))


def test_more_buckets_than_timesteps_is_coarser_buckets_not_a_crash(setup):
    """fisher.profile_buckets above diffusion.timesteps left buckets without a timestep (randint from 1 to 1)."""
    _, model, _, pool = setup
    with pytest.raises(ValueError, match="10 timestep buckets for 5 timesteps"):
        draw_samples(pool, 20, 5, seed=0, strata=10)
    art = compute_fisher(model, NoiseSchedule(5, 1e-4, 0.02), pool,
                         fcfg(n_samples=20, chunk_size=20, profile_buckets=10, timestep_sampling="stratified"),
                         progress=False)
    assert all(torch.isfinite(v).all() for v in art["diag"].values())


def test_chain_error_bar_is_zero_when_every_chain_contributes_the_same_and_groups_are_uneven():
    """16 chains in 5 groups (4, 3, 3, 3, 3): each group's mean scaled by G assumed 16 / 5 chains per group, so
    the error bar held the groups' size differences (6% for a constant contribution)."""
    from common.importance.chain import _rel_sem

    chains = torch.bincount(torch.arange(16) % 5, minlength=5)
    sums = chains.double()[:, None].repeat(1, 2)  # projection p sees group p: one unit per chain
    assert _rel_sem(sums, 5, torch.ones(5, dtype=torch.float64), chains) == [0.0, 0.0]


def test_stratified_fisher_is_the_bucket_weighted_mean_with_intervals(setup):
    _, model, schedule, pool = setup
    art = compute_fisher(model, schedule, pool, fcfg(n_samples=6, timestep_sampling="stratified", bootstrap=200),
                         progress=False)
    names = eligible_names(model, "poster")
    x0, t, eps = draw_samples(pool, 6, schedule.timesteps, seed=0, strata=2)
    assert art["meta"]["timesteps"] == t.tolist() and art["meta"]["bucket_counts"] == [3, 3]
    ref = per_sample_sq_grads_loop(model, schedule, names, x0, t, eps)
    for n in names[:5]:  # T=100, K=2: equal widths and counts, so the plain mean
        torch.testing.assert_close(art["diag"][n], ref[n].mean(0), rtol=1e-4, atol=1e-12)
    for n in names:
        lo, hi = art["per_tensor_ci"][n]
        assert lo <= hi and (lo <= art["per_tensor"][n] <= hi or art["per_tensor"][n] == 0)
    for st, (lo, hi) in art["per_layer_ci"].items():
        assert lo <= art["per_layer"][st] * (1 + 1e-9) and art["per_layer"][st] <= hi * (1 + 1e-9)
    assert art["ci"]["resamples"] == 200 and "within timestep strata" in art["ci"]["method"]
    assert art["sample_sums"].shape == (6, len(names))


@pytest.mark.slow
def test_stratified_timesteps_reduce_the_spread_of_repeated_estimates(setup, data_root):
    """Ten independent 20-sample estimates per rule: stratified per-stage Fisher varies less.

    Needs a (briefly) trained smoke model: only training makes small-t gradients dominate, which is
    what makes i.i.d. timesteps noisy (on random weights the Fisher barely depends on t).
    """
    from common.diffusion.data import load_mnist, to_model_space

    cfg, _, schedule, _ = setup
    x = to_model_space(load_mnist(data_root, "train")[0][:256], 32)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size)
    opt, gen = torch.optim.Adam(model.parameters(), 2e-3), torch.Generator().manual_seed(0)
    for _ in range(150):  # measured: after 150 steps small t dominate and stratifying halves the spread
        i, t = torch.randint(0, len(x), (16,), generator=gen), torch.randint(0, 100, (16,), generator=gen)
        loss = schedule.p_losses(model, x[i], t, torch.randn(16, 1, 32, 32, generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    spread = {}
    for rule in ("uniform", "stratified"):
        totals = torch.tensor([[v for v in compute_fisher(
            model, schedule, x, fcfg(n_samples=20, chunk_size=20, seed=seed, profile_buckets=10,
                                     timestep_sampling=rule), progress=False)["per_layer_total"].values()]
            for seed in range(10)])
        spread[rule] = (totals.std(0) / totals.mean(0)).mean().item()  # mean relative spread over stages
    assert spread["stratified"] < spread["uniform"], spread


def test_stratified_with_fewer_samples_than_buckets_uses_coarser_strata(setup):
    _, model, schedule, pool = setup
    art = compute_fisher(model, schedule, pool, fcfg(n_samples=2, profile_buckets=10, timestep_sampling="stratified",
                                                     bootstrap=10), progress=False)
    t = art["meta"]["timesteps"]
    assert t[0] < 50 <= t[1] and "in 2 equal-width buckets" in art["meta"]["timestep_rule"]
