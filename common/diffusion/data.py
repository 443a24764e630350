"""MNIST from IDX files under a configurable root (offline first, torchvision download optional)."""
import gzip
import os
import zlib

import numpy as np
import torch

from ..core.storage import CorruptFileError

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX type byte -> numpy dtype (big-endian on disk).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


REPLACE_HINT = "re-download it (delete it and set data.download: true where online) or replace it with an intact copy"


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (plain or .gz) into a numpy array of its declared shape and dtype.
    A damaged file raises CorruptFileError (a ValueError) naming it, in one line."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # a truncated download ends the gzip stream early
        raise CorruptFileError(f"{path}: truncated or corrupt gzip file ({e}); {REPLACE_HINT}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise CorruptFileError(f"{path}: not an IDX file (bad magic {raw[:4].hex()}); {REPLACE_HINT}")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise CorruptFileError(f"{path}: header says {dims} ({expected} bytes) but {len(raw) - offset} bytes "
                               f"follow; {REPLACE_HINT}")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


def _find(root: str, stem: str):
    """Candidate locations, torchvision's layout first; returns (found path or None, looked-at list)."""
    looked = []
    for folder in (os.path.join(root, "MNIST", "raw"), root):
        for name in (stem, stem + ".gz"):
            p = os.path.join(folder, name)
            looked.append(p)
            if os.path.isfile(p):
                return p, looked
    return None, looked


def load_mnist(root: str, split: str = "train", download: bool = False):
    """Return (images uint8 (N, 28, 28), labels int64 (N,)) for split 'train' or 'test'."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    paths = []
    for stem in _FILES[split]:
        path, looked = _find(root, stem)
        if path is None and download:
            import torchvision  # only needed where a download can work

            try:
                torchvision.datasets.MNIST(root=root, train=(split == "train"), download=True)
            except Exception as e:  # offline: report where we looked, not a URL traceback
                download_error = f" torchvision download failed too ({type(e).__name__}: {str(e).splitlines()[0]})."
            else:
                download_error = ""
            path, looked = _find(root, stem)
        if path is None:
            hint = download_error if download else " (set data.download: true to fetch with torchvision where online)"
            raise FileNotFoundError(
                f"MNIST file {stem}[.gz] not found; looked for: {', '.join(looked)}. "
                f"Set data.root or LAQFI_DATA_ROOT to the folder holding MNIST/raw/{hint}"
            )
        paths.append(path)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise CorruptFileError(f"{paths[0]} / {paths[1]}: shapes {images.shape} and {labels.shape} do not pair up")
    for path, arr, what in ((paths[0], images, "images"), (paths[1], labels, "labels")):
        if arr.dtype != np.uint8:  # MNIST's are unsigned bytes; other dtypes would be rescaled as if they were
            raise CorruptFileError(f"{path}: {what} of IDX type {arr.dtype}, MNIST's are uint8; {REPLACE_HINT}")
    if labels.size and labels.max() > 9:
        raise CorruptFileError(f"{path}: labels up to {int(labels.max())}, MNIST's are 0-9; {REPLACE_HINT}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def to_model_space(images_u8: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, S, S) in [-1, 1], zero-padded (black, i.e. -1) to S."""
    x = images_u8.float().div(127.5).sub(1.0)[:, None]
    pad = image_size - x.shape[-1]
    if pad:
        x = torch.nn.functional.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), value=-1.0)
    return x


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model output in [-1, 1] -> uint8 exactly as a saved PNG would hold it (clamp, scale, round)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def mnist_tensor(data_cfg, split: str = "train", limit=None):
    """(images (N, 1, S, S) float in [-1, 1], labels (N,)) ready for the model."""
    images, labels = load_mnist(data_cfg.root, split, data_cfg.download)
    limit = limit if limit is not None else (data_cfg.train_limit if split == "train" else None)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return to_model_space(images, data_cfg.image_size), labels
