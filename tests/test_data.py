"""common.diffusion.data: IDX reading (synthetic files), MNIST lookup, model-space conversion."""
import gzip

import numpy as np
import pytest
import torch

from common.core.storage import CorruptFileError
from common.diffusion.data import load_mnist, mnist_tensor, read_idx, to_model_space, to_uint8


def idx_bytes(arr: np.ndarray, type_byte: int = 0x08) -> bytes:
    header = bytes([0, 0, type_byte, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.tobytes()


def write_idx(path, arr, type_byte=0x08, gz=None):
    data = idx_bytes(arr, type_byte)
    gz = str(path).endswith(".gz") if gz is None else gz
    with (gzip.open if gz else open)(path, "wb") as fh:
        fh.write(data)
    return str(path)


def synthetic_split(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_images_and_labels(tmp_path, suffix):
    images, labels = synthetic_split(5)
    got_i = read_idx(write_idx(tmp_path / f"img{suffix}", images))
    got_l = read_idx(write_idx(tmp_path / f"lab{suffix}", labels))
    assert got_i.dtype == np.uint8 and got_i.shape == (5, 28, 28)
    assert got_l.dtype == np.uint8 and got_l.shape == (5,)
    np.testing.assert_array_equal(got_i, images)
    np.testing.assert_array_equal(got_l, labels)


def test_read_idx_big_endian_types_become_native(tmp_path):
    a = (np.arange(-6, 6).reshape(3, 4) * 1000).astype(">i4")  # big-endian bytes on disk
    got = read_idx(write_idx(tmp_path / "ints", a, 0x0C))
    assert got.dtype == np.dtype("int32") and got.dtype.isnative
    np.testing.assert_array_equal(got, a.astype(np.int32))
    f = np.linspace(-1, 1, 7).astype(">f8")
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "f.gz", f, 0x0E)), f.astype(np.float64))


@pytest.mark.parametrize("content", [b"\x00\x01\x08\x01\x00\x00\x00\x01\x05",  # second byte not 0
                                     b"\x00\x00\x07\x01\x00\x00\x00\x01\x05",  # unknown type byte
                                     b"\x00\x00",                               # shorter than a magic
                                     b"PK\x03\x04 not idx at all"])
def test_read_idx_bad_magic(tmp_path, content):
    p = tmp_path / "bad-idx"
    p.write_bytes(content)
    with pytest.raises(ValueError) as e:
        read_idx(str(p))
    assert str(p) in str(e.value) and "not an IDX file" in str(e.value)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_truncated(tmp_path, suffix):
    images, _ = synthetic_split(3)
    data = idx_bytes(images)[:-10]
    p = tmp_path / f"trunc{suffix}"
    with (gzip.open if suffix else open)(p, "wb") as fh:
        fh.write(data)
    with pytest.raises(ValueError) as e:
        read_idx(str(p))
    assert str(p) in str(e.value) and "[3, 28, 28]" in str(e.value)


def test_truncated_gzip_download_is_one_line_naming_the_file(tmp_path):
    """A half-downloaded train-images-idx3-ubyte.gz ends the gzip stream early (EOFError inside gzip)."""
    images, _ = synthetic_split(50)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(p, images)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(CorruptFileError) as e:
        read_idx(str(p))
    msg = str(e.value)
    assert str(p) in msg and "truncated or corrupt gzip" in msg and "re-download" in msg and "\n" not in msg


def test_read_idx_trailing_bytes_rejected(tmp_path):
    p = tmp_path / "long"
    p.write_bytes(idx_bytes(np.zeros(4, np.uint8)) + b"\x00")
    with pytest.raises(ValueError, match="long"):
        read_idx(str(p))


def make_root(tmp_path, n_train=7, n_test=4, gz=True, folder=("MNIST", "raw")):
    raw = tmp_path.joinpath(*folder)
    raw.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if gz else ""
    out = {}
    for split, n, stems in (("train", n_train, ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")),
                            ("test", n_test, ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))):
        images, labels = synthetic_split(n, seed=n)
        write_idx(raw / (stems[0] + sfx), images)
        write_idx(raw / (stems[1] + sfx), labels)
        out[split] = (images, labels)
    return out


@pytest.mark.parametrize("gz", [True, False])
def test_load_mnist_from_synthetic_root(tmp_path, gz):
    want = make_root(tmp_path, gz=gz)
    for split in ("train", "test"):
        images, labels = load_mnist(str(tmp_path), split)
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert torch.equal(images, torch.from_numpy(want[split][0]))
        assert torch.equal(labels, torch.from_numpy(want[split][1].astype(np.int64)))


def test_load_mnist_accepts_files_directly_under_root(tmp_path):
    want = make_root(tmp_path, folder=())
    images, _ = load_mnist(str(tmp_path), "test")
    assert images.shape == (4, 28, 28) and torch.equal(images, torch.from_numpy(want["test"][0]))


def test_load_mnist_rejects_unpaired_files(tmp_path):
    make_root(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))  # 4 images, 3 labels
    with pytest.raises(ValueError, match="do not pair up"):
        load_mnist(str(tmp_path), "test")


def test_load_mnist_refuses_other_dtypes_and_labels_above_nine(tmp_path):
    """A float IDX image file would be rescaled as if it held bytes; a label 12 would index no class."""
    make_root(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw / "t10k-images-idx3-ubyte.gz", np.ones((4, 28, 28), ">f4"), type_byte=0x0D)
    with pytest.raises(CorruptFileError, match="t10k-images.*images of IDX type float32, MNIST's are uint8"):
        load_mnist(str(tmp_path), "test")
    make_root(tmp_path)
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 12, 3], np.uint8))
    with pytest.raises(CorruptFileError, match="t10k-labels.*labels up to 12, MNIST's are 0-9"):
        load_mnist(str(tmp_path), "test")


def test_load_mnist_missing_lists_paths(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_mnist(str(tmp_path), "test", download=False)
    msg = str(e.value)
    for p in (tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte",
              tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz",
              tmp_path / "t10k-images-idx3-ubyte",
              tmp_path / "t10k-images-idx3-ubyte.gz"):
        assert str(p) in msg
    assert "LAQFI_DATA_ROOT" in msg and "data.download" in msg


def test_load_mnist_bad_split(tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_mnist(str(tmp_path), "val")


def test_real_mnist_test_split(data_root):
    images, labels = load_mnist(data_root, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and set(labels.unique().tolist()) == set(range(10))
    assert images.max() == 255 and images.min() == 0


def test_mnist_tensor_limits_train_only(tiny_cfg):
    x, y = mnist_tensor(tiny_cfg.data, "train")
    assert x.shape == (256, 1, 32, 32) and len(y) == 256  # smoke: train_limit 256
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    x5, _ = mnist_tensor(tiny_cfg.data, "train", limit=5)
    assert torch.equal(x5, x[:5])


def test_to_model_space_pads_and_scales():
    u = torch.zeros(2, 28, 28, dtype=torch.uint8)
    u[0] = 255
    u[1, 0, 0] = 255
    x = to_model_space(u, 32)
    assert x.shape == (2, 1, 32, 32) and x.dtype == torch.float32
    assert torch.all(x[0, 0, 2:30, 2:30] == 1.0)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert torch.all(x[:, 0][:, border] == -1.0)      # padding is black (-1)
    assert x[1, 0, 2, 2] == 1.0 and x[1, 0, 2, 3] == -1.0  # 255 -> 1, 0 -> -1, offset by the pad
    assert to_model_space(u, 28).shape == (2, 1, 28, 28)
    odd = to_model_space(u, 31)  # odd padding: 1 before, 2 after
    assert odd.shape == (2, 1, 31, 31) and odd[0, 0, 1, 1] == 1.0 and odd[0, 0, 0, 0] == -1.0
    assert odd[0, 0, 28, 28] == 1.0 and odd[0, 0, 29, 29] == -1.0


def test_to_uint8_round_trips_every_value():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16)
    x = to_model_space(u, 16)
    assert torch.equal(to_uint8(x)[:, 0], u)
    assert torch.equal(to_uint8(torch.tensor([-5.0, -1.0, 0.0, 1.0, 7.0])),
                       torch.tensor([0, 0, 128, 255, 255], dtype=torch.uint8))  # clamped; 127.5 rounds to even
