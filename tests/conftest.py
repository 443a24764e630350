"""Shared fixtures: one CPU thread, the real MNIST root, and a tiny config writing under tmp_path."""
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")

torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end to end (scripts, training, sampling); `make test-quick` skips it")


# Test files by their measured share of `make test` (pytest --durations=0, summed per file), slowest first.
# `make test` hands whole files to the workers in collection order (--no-loadscope-reorder), so the longest
# files start first and the short ones fill the gaps at the end instead of one long file running alone.
SLOWEST_FILES = (
    "test_lowbit.py", "test_distributed.py", "test_scripts.py", "test_backends.py", "test_pipeline.py",
    "test_verify.py", "test_bench.py", "test_w4a4.py", "test_fisher.py", "test_finetune.py", "test_classifier.py",
    "test_train.py", "test_w4a4_tools.py", "test_metrics.py", "test_dit.py", "test_act_quant_script.py",
    "test_lock.py",
)


def _file_rank(item) -> int:
    name = os.path.basename(str(item.fspath))
    return SLOWEST_FILES.index(name) if name in SLOWEST_FILES else len(SLOWEST_FILES)


def pytest_collection_modifyitems(config, items):
    """Every test built on the shared smoke run is end to end, so ``slow`` without being told."""
    for item in items:
        if "smoke_baseline" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    items.sort(key=_file_rank)  # stable: the order inside a file is kept


@pytest.fixture(autouse=True)
def _one_thread():
    """The test machine has 2 cores shared with other jobs: keep torch on one thread."""
    torch.set_num_threads(1)
    yield


def _resolve_data_root() -> str:
    root = os.environ.get("LAQFI_DATA_ROOT") or os.path.join("..", "shared", "data")
    if not os.path.isabs(root):
        root = os.path.join(ROOT, root)
    return os.path.normpath(root)


@pytest.fixture(scope="session")
def data_root() -> str:
    """Absolute path of the folder holding MNIST/raw/ (LAQFI_DATA_ROOT or ../shared/data)."""
    root = _resolve_data_root()
    raw = os.path.join(root, "MNIST", "raw")
    needed = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    if not all(os.path.isfile(os.path.join(raw, n)) or os.path.isfile(os.path.join(raw, n + ".gz")) for n in needed):
        pytest.skip(f"real MNIST not found under {raw} (set LAQFI_DATA_ROOT)")
    return root


@pytest.fixture
def tiny_cfg(tmp_path, data_root, monkeypatch):
    """configs/smoke.yaml with outputs under tmp_path and data.root at the real MNIST.

    ``load_config`` replaces data.root with a non-empty LAQFI_DATA_ROOT *after* the overrides,
    so the env var is pinned to the same absolute path (a relative one would depend on the cwd).
    """
    from common.core.config import load_config

    monkeypatch.setenv("LAQFI_DATA_ROOT", data_root)
    cfg = load_config(SMOKE, overrides=[f"run.out_dir={tmp_path}/runs", f"run.cache_dir={tmp_path}/cache",
                                        f"data.root={data_root}"])
    assert cfg.data.root == data_root
    return cfg


@pytest.fixture(scope="module")
def tiny_model_fisher():
    """(smoke config, smoke-sized U-Net with random weights, a random Fisher artifact over its eligible
    tensors whose tensors' scales span several decades)."""
    from common.core.config import load_config
    from common.diffusion.model import build_model
    from common.quant.eligibility import eligible_names

    cfg = load_config(SMOKE)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size).eval()
    g = torch.Generator().manual_seed(1)
    fisher = {"per_tensor": {}, "diag": {}, "meta": {"eligible_rule": "poster", "n_samples": 4, "seed": 0}}
    params = dict(model.named_parameters())
    for n in eligible_names(model):
        d = torch.rand(params[n].shape, generator=g) * 10.0 ** torch.randint(-3, 3, (1,), generator=g)
        fisher["diag"][n], fisher["per_tensor"][n] = d, float(d.mean())
    return cfg, model, fisher


@pytest.fixture(scope="session")
def smoke_baseline(tmp_path_factory, data_root):
    """One smoke baseline for the whole test run (``simplediffusion.py --skip-eval``: the tiny U-Net trained with
    snapshots, its Fisher; the smoke and the 300-image MNIST classifiers cached), made once per pytest worker; the
    returned function copies it into a test's own folder (``runs/`` and ``cache/``, as ``test_pipeline.run`` lays
    them out) so tests never share outputs."""
    import shutil
    import subprocess
    import sys

    os.environ["LAQFI_DATA_ROOT"] = data_root
    src = tmp_path_factory.mktemp("smoke_baseline")
    cmd = [sys.executable, os.path.join(ROOT, "simplediffusion.py"), "--config", SMOKE, "--set",
           f"run.out_dir={src}/runs", "--set", f"run.cache_dir={src}/cache", "--no-progress", "--skip-eval",
           "--set", "train.snapshot_every=1"]  # snapshots for the learning curve and verify (not a training input)
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), cwd=src)
    assert p.returncode == 0, p.stdout + p.stderr
    from common.core.config import load_config
    from common.evaluation.classifier import load_or_train_classifier

    for limit in (None, 300):  # the smoke classifier, and the 300-image one most end-to-end tests ask for
        cfg = load_config(SMOKE, [f"run.cache_dir={src}/cache"] + ([f"eval.classifier.train_limit={limit}"]
                                                                    if limit else []))
        load_or_train_classifier(cfg.run.cache_dir, cfg.data, cfg.eval.classifier, progress=False)

    def copy_into(dst):
        for sub in ("runs", "cache"):
            if (src / sub).exists():
                shutil.copytree(src / sub, dst / sub, dirs_exist_ok=True)
        return dst

    return copy_into
