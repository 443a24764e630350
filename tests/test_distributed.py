"""Under torchrun (2 ranks, gloo, CPU) the scripts give what one process gives: a training step, the Fisher,
the evaluation's samples and metrics, a sweep's variants; a last batch smaller than the number of ranks trains;
and a rank that fails ends the run quickly.

Floats are compared exactly only where both layouts run the same computation (a sampling batch, a Fisher chunk,
a whole sweep variant on one rank); where the layouts sum in another order (the Fisher's chunks, the training
gradient's all-reduce) the tolerance is derived from float32 summation error and stated beside the check."""
import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from test_pipeline import ROOT, run

from common.core import storage
from common.core.config import load_config
from common.core.storage import fingerprint
from common.diffusion.checkpoint import training_inputs

pytestmark = pytest.mark.slow  # end to end: scripts on the smoke config

SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")
CLF = ["--set", "eval.classifier.train_limit=300"]


def torchrun(script, tmp, *extra, ranks=2, timeout=600, check=True):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", LAQFI_DIST_TIMEOUT="600")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           os.path.join(ROOT, script), "--config", SMOKE, "--set", f"run.out_dir={tmp}/runs", "--set",
           f"run.cache_dir={tmp}/cache", "--no-progress", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"torchrun {script} failed:\n{p.stdout[-3000:]}\n" + "\n".join(
            ln for ln in p.stderr.splitlines() if "rank0]" not in ln)[-4000:])
    return p


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, smoke_baseline):
    """The reference: a plain run (the shared smoke training and Fisher, fp32 and uniform evaluation)."""
    tmp = smoke_baseline(tmp_path_factory.mktemp("dist"))
    run("simplediffusion.py", tmp, *CLF)
    return tmp


def test_two_ranks_evaluate_and_compute_fisher_like_one(one_rank):
    """Exact comparisons where both layouts run the same computation: each sampling batch runs whole on one rank
    (the same shapes through the same kernels, with the same thread count), and the Fisher's chunks of samples are
    the same on one rank or two. Only the Fisher's sum over chunks changes order; its terms are squares (>= 0), so
    each layout's float32 sum is within gamma_m = m u / (1 - m u) (u = 2^-24, m chunks) of the exact one,
    relatively, and the two within 2 gamma_m of each other."""
    tmp = one_rank
    ref, two = tmp / "runs" / "smoke", tmp / "runs" / "two"
    (two / "baseline").mkdir(parents=True)
    shutil.copy(ref / "baseline" / "checkpoint.pt", two / "baseline" / "checkpoint.pt")  # same weights; Fisher,
    torchrun("simplediffusion.py", tmp, "--set", "run.name=two", *CLF)  # samples and metrics recomputed on 2 ranks
    for v in ("fp32", "uniform_fp16"):
        a, b = (json.load(open(d / v / "metrics.json")) for d in (ref, two))
        for seed in a["per_seed"]:
            xa, xb = (torch.load(d / v / f"samples_seed{seed}.pt") for d in (ref, two))
            assert torch.equal(xa, xb), (v, seed)  # each image's noise comes from its batch index, not the rank
            for key in ("clf_fid", "clf_is", "paired_mse_vs_fp32", "samples_sha256"):
                assert a["per_seed"][seed][key] == b["per_seed"][seed][key], (v, key)
        assert b["world_size"] == 2 and a["world_size"] == 1
    fa, fb = (torch.load(d / "baseline" / "fisher.pt") for d in (ref, two))
    cfg = load_config(SMOKE)
    m = -(-cfg.fisher.n_samples // cfg.fisher.chunk_size)
    for n in fa["diag"]:
        assert torch.allclose(fa["diag"][n], fb["diag"][n], rtol=2 * gamma(m), atol=0), n


# ----------------------------------------------------------------------------- training: gradients, then the step
U = 2.0 ** -24  # float32 unit roundoff


def gamma(k: int) -> float:
    """Higham's gamma_k = k u / (1 - k u): a float32 sum of k terms x_i is within gamma_k * sum |x_i| of the exact
    sum, whatever the order of the additions (Higham 2002, eq. 4.4)."""
    return k * U / (1 - k * U)


RECORD = """# run a script, recording every optimiser step's weights and (all-reduced) gradients on rank 0
import os, runpy, sys
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

steps = []


def record(opt, args, kwargs):  # before the step: DDP has all-reduced the gradients, clipping has run
    params = [p for g in opt.param_groups for p in g["params"]]
    steps.append({"weights": [p.detach().clone() for p in params], "grads": [p.grad.detach().clone() for p in params]})


def save():
    if os.environ.get("RANK", "0") == "0":
        torch.save(steps, out)


register_optimizer_step_pre_hook(record)
script, out = sys.argv[1], sys.argv[2]
sys.argv = [script] + sys.argv[3:]
from common.core import distributed  # a finished gloo rank leaves at once (os._exit): save before it does
leave = distributed.leave
distributed.leave = lambda: (save(), leave())
try:
    runpy.run_path(script, run_name="__main__")
finally:
    save()
"""


FP32 = "train.bf16=false"  # the layouts are compared in float32 on every machine (auto picks bf16 where native)


def recorded(tmp, ranks, name, *extra, check=True):
    """simplediffusion.py on ``ranks`` processes (1: plain), in float32, writing runs/<name>; returns (every
    optimiser step's {"weights", "grads"} as rank 0 saw them, the process)."""
    wrapper = tmp / "record_steps.py"
    wrapper.write_text(RECORD)
    out = tmp / f"{name}.{len(list(tmp.glob('*.steps.pt')))}.steps.pt"  # a resumed run keeps the first one's
    args = [str(wrapper), os.path.join(ROOT, "simplediffusion.py"), str(out), "--config", SMOKE, "--set",
            f"run.out_dir={tmp}/runs", "--set", f"run.cache_dir={tmp}/cache", "--set", f"run.name={name}",
            "--set", FP32, "--no-progress", "--skip-eval", *extra]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", LAQFI_DIST_TIMEOUT="600")
    p = subprocess.run([sys.executable, *launcher, *args], capture_output=True, text=True, env=env, cwd=tmp,
                       timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{name} ({ranks} ranks) failed:\n{p.stdout[-3000:]}\n{p.stderr[-4000:]}")
    return (torch.load(out, weights_only=True) if out.exists() else []), p


def _step_batch(cfg, step: int):
    """(x0, t, eps) of training step ``step``'s global batch, drawn as ``train`` draws them."""
    from common.diffusion import train as T
    from common.diffusion.data import mnist_tensor

    x = mnist_tensor(cfg.data, "train")[0]
    idx = T._batch_indices(cfg.run.seed, step, len(x), cfg.train.batch_size)
    gen = T._step_rng(cfg.run.seed, step)
    t = torch.randint(0, cfg.diffusion.timesteps, (len(idx),), generator=gen)
    return x[idx], t, torch.randn(x[idx].shape, generator=gen)


def _model_at(cfg, weights: dict, dtype=torch.float32):
    from common.diffusion.model import build_model

    model = build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size).to(dtype)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(weights[n])
    return model.train()


def one_process_gradient(cfg, weights: dict, step: int, share=slice(None)):
    """({param: gradient}, loss) of step ``step``'s batch (``share``: only these of its images) at ``weights`` in
    float32, computed as one training process computes it (the same ops, shapes and thread count), so a plain
    process's recorded gradient equals it bit for bit."""
    from common.diffusion.schedule import NoiseSchedule

    x0, t, eps = (v[share] for v in _step_batch(cfg, step))
    model = _model_at(cfg, weights)
    before = torch.get_num_threads()
    torch.set_num_threads(cfg.run.threads)  # as the training ran: oneDNN's reductions depend on the thread count
    try:
        loss = NoiseSchedule.from_config(cfg.diffusion).p_losses(model, x0, t, eps, cfg.train.min_snr_gamma)
        loss.backward()
    finally:
        torch.set_num_threads(before)
    return {n: p.grad for n, p in model.named_parameters()}, float(loss.detach())


def summation_tolerance(cfg, weights: dict, step: int) -> dict:
    """{param: how far two float32 gradients of step ``step``'s batch at ``weights`` may be apart when they split
    and sum the batch differently (one process, or ranks whose shares DDP all-reduces)}.

    Derived from float32 summation error: every element of a weight's (bias's, norm's) gradient is a sum over the
    K positions the parameter is shared over (images x output pixels or tokens) of terms x_k = delta_k * a_k (the
    output's gradient times the input). A float32 sum of K terms is within gamma_K * sum_k |x_k| of the exact sum
    in any order and any grouping (Higham 2002, eq. 4.4), so two such sums are within 2 gamma_K sum_k |x_k| of each
    other; 2 u more per side cover the loss weighting and DDP's division. sum_k |x_k| is computed here in float64
    from |delta| and |a| of the same pass (for a conv or linear weight: the gradient of <|delta|, layer(|a|)>, which
    is bilinear). Both layouts compute each image's terms with the same float32 ops, but the kernels differ with the
    batch shape, so the terms agree to rounding only: the bound is taken per tensor, the tensor's largest
    sum_k |x_k| its scale (an element whose own terms are tiny still receives rounding from its neighbours).
    Measured on the smoke model: 2 ranks against 1 stay 50x inside it, while one rank's half of the batch alone (a
    missing all-reduce) is at least 10x outside it, on every tensor."""
    import copy
    import warnings

    import torch.nn.functional as F
    from torch import nn

    from common.diffusion.schedule import NoiseSchedule

    x0, t, eps = _step_batch(cfg, step)
    model = _model_at(cfg, weights, torch.float64)
    kinds = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.GroupNorm)
    mods = {n: m for n, m in model.named_modules() if isinstance(m, kinds)}
    assert {f"{n}.{k}" for n, m in mods.items() for k, _ in m.named_parameters(recurse=False)} == set(weights)
    seen, hooks = {}, []
    for n, m in mods.items():
        hooks.append(m.register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, {}).setdefault("a", []).append(
            a[0].detach())))
        hooks.append(m.register_full_backward_hook(lambda m, gi, go, n=n: seen[n].__setitem__("d", go[0].detach())))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the first conv's input needs no gradient: its hook still sees delta
        NoiseSchedule.from_config(cfg.diffusion).p_losses(model, x0.double(), t, eps.double(),
                                                          cfg.train.min_snr_gamma).backward()
    for h in hooks:
        h.remove()
    tol = {}
    for n, m in mods.items():
        assert len(seen[n]["a"]) == 1, f"{n} runs twice per forward: the bound needs each term once"
        a, d = seen[n]["a"][0], seen[n]["d"]
        ch = d.dim() - 1 if isinstance(m, nn.Linear) else 1
        dims = [k for k in range(d.dim()) if k != ch]
        k = max(d.numel() // d.shape[ch], a.numel() // a.shape[ch])
        mag = {"bias": d.abs().sum(dims)} if m.bias is not None else {}
        if isinstance(m, nn.GroupNorm):
            mag["weight"] = (d.abs() * F.group_norm(a, m.num_groups, None, None, m.eps).abs()).sum(dims)
        else:
            absolute = copy.deepcopy(m)
            absolute.bias = None
            mag["weight"] = torch.autograd.grad((absolute(a.abs()) * d.abs()).sum(), absolute.weight)[0]
        for key, v in mag.items():
            tol[f"{n}.{key}"] = 2 * (gamma(k) + 2 * U) * float(v.max())
    return tol


def _beyond(g: dict, ref: dict, tol: dict) -> list:
    """The tensors whose gradient ``g`` is further from ``ref`` than the tolerance."""
    return [n for n in ref if float((g[n].double() - ref[n].double()).abs().max()) > tol[n]]


def _adam_step(cfg, weights: dict, grads: dict, step: int, steps: int, state=None) -> dict:
    """The weights ``train``'s optimiser makes of ``weights`` and ``grads`` at ``step`` (``state``: its saved state)."""
    from common.diffusion import train as T

    model = _model_at(cfg, weights)
    opt_cls = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    if state is not None:
        opt.load_state_dict(state)
    for group in opt.param_groups:
        group["lr"] = T.lr_at(cfg.train, step, steps)
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    opt.step()
    return {n: p.detach() for n, p in model.named_parameters()}


def _names(cfg):
    from common.diffusion.model import build_model

    return [n for n, _ in build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size).named_parameters()]


def test_two_ranks_train_the_same_step_as_one(tmp_path, data_root, monkeypatch):
    """Two ranks' all-reduced gradient is the full batch's, to float32 summation error (``summation_tolerance``),
    and the optimiser then makes of it exactly what it makes of any gradient. (Weights after an Adam step are not
    compared across layouts: its first update is about lr * g / (|g| + eps), so for an element whose gradient is
    near eps a float32 rounding difference in g becomes a visible change of the weight.)"""
    monkeypatch.setenv("LAQFI_DATA_ROOT", data_root)
    step = ["--set", "train.max_steps=1"]
    cfg = load_config(SMOKE, ["train.max_steps=1", FP32])
    names = _names(cfg)
    one, _ = recorded(tmp_path, 1, "t1", *step)
    two, _ = recorded(tmp_path, 2, "t2", *step)
    assert len(one) == len(two) == 1
    w0 = dict(zip(names, one[0]["weights"], strict=True))
    assert all(torch.equal(w, w0[n]) for n, w in zip(names, two[0]["weights"], strict=True))  # the same start
    g1, g2 = (dict(zip(names, r[0]["grads"], strict=True)) for r in (one, two))
    full, loss = one_process_gradient(cfg, w0, 0)
    assert all(torch.equal(g1[n], full[n]) for n in names)  # one process: the batch's gradient, computed here too
    tol = summation_tolerance(cfg, w0, 0)
    assert not _beyond(g2, g1, tol), _beyond(g2, g1, tol)[:3]
    # it can fail: rank 0's own gradient (its half of the batch, as if the all-reduce were missing) is refused
    half, _ = one_process_gradient(cfg, w0, 0, share=slice(0, cfg.train.batch_size // 2))
    assert _beyond(half, g1, tol) == names
    losses = {}
    for name, g in (("t1", g1), ("t2", g2)):
        ckpt = torch.load(tmp_path / "runs" / name / "baseline" / "checkpoint.pt", weights_only=True)
        assert ckpt["step"] == 1
        after = _adam_step(cfg, w0, g, 0, 1)
        for n in names:  # the optimiser's step on that gradient, bit for bit
            assert torch.equal(after[n], ckpt["model"][n]), (name, n)
        losses[name] = ckpt["loss_history"][0]
    # the loss is a mean of B*C*H*W squares (>= 0): two float32 sums of them are within 2 gamma_N, relatively
    assert losses["t1"] == loss and abs(losses["t2"] - loss) <= 2 * (gamma(16 * 32 * 32) + 2 * U) * loss
    # --resume across a changed N: the 2 ranks' step 1, made the partial checkpoint of a 2-step run (what an
    # interruption after step 1 leaves: the smoke config's learning rate does not depend on the step count),
    # continued by one process, which takes step 2 as one process does from that state: the gradient of step 2's
    # batch at the checkpoint's weights, and the optimiser's second step from the checkpoint's moments
    two_steps = load_config(SMOKE, ["train.max_steps=2", FP32])
    path = tmp_path / "runs" / "t2" / "baseline" / "checkpoint.pt"
    b = torch.load(path, weights_only=True)
    b["config"]["train"]["max_steps"], b["total_steps"], b["finished"] = 2, 2, False
    b["training_inputs"], b["fingerprint"] = training_inputs(two_steps), fingerprint(training_inputs(two_steps))
    for f in path.parent.iterdir():  # an interrupted training leaves only its checkpoint
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    storage.save_cache(b, path)  # as training writes it: with the digest of what it now holds
    resumed, _ = recorded(tmp_path, 1, "t2", "--set", "train.max_steps=2", "--resume")
    assert len(resumed) == 1
    w1 = dict(zip(names, resumed[0]["weights"], strict=True))
    assert all(torch.equal(w1[n], b["model"][n]) for n in names)
    g = dict(zip(names, resumed[0]["grads"], strict=True))
    want, _ = one_process_gradient(two_steps, w1, 1)
    assert all(torch.equal(g[n], want[n]) for n in names)
    final = torch.load(path, weights_only=True)
    assert final["step"] == 2 and final["finished"]
    after = _adam_step(two_steps, w1, g, 1, 2, state=b["optimizer"])
    assert all(torch.equal(after[n], final["model"][n]) for n in names)
    bad = torchrun("simplediffusion.py", tmp_path, "--set", "run.name=t3", "--set", "train.batch_size=15", *step,
                   "--set", FP32, "--skip-eval", check=False)
    assert bad.returncode != 0 and "does not divide among 2 ranks" in bad.stderr


def test_a_last_batch_smaller_than_the_ranks_leaves_no_rank_empty(tmp_path, data_root, monkeypatch):
    """17 training images in batches of 16: the epoch's second batch holds one image for two ranks. Before, the
    rank without an image took the mean loss of none (NaN) and the run stopped; now it joins the all-reduce with
    that image at weight 0, and the other weighs its loss 2, so DDP's average is the image's gradient exactly
    ((2 g + 0) / 2: powers of two and a zero), as one process computes it."""
    monkeypatch.setenv("LAQFI_DATA_ROOT", data_root)
    extra = ["data.train_limit=17", "train.max_steps=2"]
    cfg = load_config(SMOKE, extra + [FP32])
    names = _names(cfg)
    rec, _ = recorded(tmp_path, 2, "r2", *[a for kv in extra for a in ("--set", kv)])
    assert len(rec) == 2 and len(_step_batch(cfg, 1)[0]) == 1
    ckpt = torch.load(tmp_path / "runs" / "r2" / "baseline" / "checkpoint.pt", weights_only=True)
    assert ckpt["finished"] and all(math.isfinite(v) for v in ckpt["loss_history"])
    want, loss = one_process_gradient(cfg, dict(zip(names, rec[1]["weights"], strict=True)), 1)
    assert all(torch.equal(g, want[n]) for n, g in zip(names, rec[1]["grads"], strict=True))
    assert ckpt["loss_history"][1] == loss


@pytest.mark.parametrize("world, n", [(2, 16), (2, 15), (2, 1), (3, 2), (4, 3), (8, 5), (3, 7)])
def test_rank_shares_cover_the_batch_and_weigh_to_its_mean(world, n, monkeypatch):
    from common.diffusion import train as T

    shares = []
    for r in range(world):
        monkeypatch.setattr(T.distributed, "rank", lambda r=r: r)
        monkeypatch.setattr(T.distributed, "world_size", lambda: world)
        shares.append(T._rank_share(n))
    assert all(s.stop > s.start for s, _ in shares)  # no rank without a sample (an empty mean is NaN)
    real = [(s, w) for s, w in shares if w > 0]
    assert [i for s, _ in real for i in range(s.start, s.stop)] == list(range(n))  # each image once, in order
    assert all(s.stop - s.start == 1 for s, w in shares if w == 0)  # the others: one image, weighed 0
    # DDP averages the ranks' gradients: (1/world) sum_r w_r * mean_r is the global batch's mean when
    # w_r = world * n_r / n, each sample then weighing 1/n
    assert all(w == world * (s.stop - s.start) / n for s, w in real)
    assert abs(sum(w for _, w in shares) / world - 1) < 1e-12


def test_a_sweep_hands_whole_variants_to_ranks(one_rank):
    """Exact: each variant is computed whole on one rank, from caches rank 0 wrote first, as one process does."""
    tmp = one_rank
    grid = ["--set", "act_quant.budgets=[W4A6]", "--set", "act_quant.plans=[uniform, fisher]", "--set",
            "act_quant.range_modes=[single]", *CLF]
    run("act_quant.py", tmp, *grid)
    other = tmp / "runs" / "sweep2"
    shutil.copytree(tmp / "runs" / "smoke" / "baseline", other / "baseline")
    torchrun("act_quant.py", tmp, "--set", "run.name=sweep2", *grid)
    for v in ("fp32", "uniform_W4A6_single", "fisher_W4A6_single"):
        a, b = (json.load(open(d / "act_quant" / v / "metrics.json")) for d in (tmp / "runs" / "smoke", other))
        assert a["paired_mse_vs_fp32"] == b["paired_mse_vs_fp32"] and a["clf_fid"] == b["clf_fid"], v
    assert (other / "act_quant" / "summary.md").exists()


def test_a_failing_rank_ends_the_run_quickly(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import sys, torch\nfrom common.core import distributed\n"
                      "distributed.init(torch.device('cpu'))\n"
                      "if distributed.rank() == 1:\n    raise SystemExit('rank 1 fails on purpose')\n"
                      "distributed.barrier()\nprint('unreachable')\n")
    env = dict(os.environ, PYTHONPATH=ROOT, LAQFI_DIST_TIMEOUT="30")
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode != 0 and "rank 1 fails on purpose" in p.stderr and "unreachable" not in p.stdout
    assert time.time() - t0 < 120


def test_a_finished_rank_exits_cleanly_whatever_the_teardown_does(tmp_path):
    """cli.run leaves a gloo rank right after main(): output flushed, status 0, and nothing of the interpreter's
    teardown runs (modelled by an exit handler that aborts, as gloo's joinable threads rarely did: SIGABRT)."""
    script = tmp_path / "done.py"
    script.write_text("import atexit, os, torch\nfrom common.core import cli, distributed\n"
                      "atexit.register(os.abort)\n"
                      "def main():\n    distributed.init(torch.device('cpu'))\n    distributed.barrier()\n"
                      "    print(f'rank {distributed.rank()} finished', end='')\n"
                      "cli.run(main)\n")
    env = dict(os.environ, PYTHONPATH=ROOT, LAQFI_DIST_TIMEOUT="60")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "rank 0 finished" in p.stdout and "rank 1 finished" in p.stdout
    plain = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert plain.returncode != 0 and "rank 0 finished" in plain.stdout  # a plain run is left to exit as usual


def test_collectives_wait_hours_not_minutes_unless_told(monkeypatch):
    """Ranks wait inside a barrier while rank 0 builds a shared cache alone (tens of minutes on a CPU): the old
    600 s default ended healthy runs. torchrun, not the timeout, ends a run whose rank died."""
    from common.core import distributed

    monkeypatch.delenv("LAQFI_DIST_TIMEOUT", raising=False)
    assert distributed.timeout_seconds() >= 3 * 3600
    monkeypatch.setenv("LAQFI_DIST_TIMEOUT", "30")
    assert distributed.timeout_seconds() == 30
    for bad in ("soon", "0", "-5"):
        monkeypatch.setenv("LAQFI_DIST_TIMEOUT", bad)
        with pytest.raises(ValueError, match="LAQFI_DIST_TIMEOUT"):
            distributed.timeout_seconds()


def test_a_gpu_process_group_also_reduces_cpu_tensors(monkeypatch):
    """Under torchrun on GPUs the group was plain NCCL, which reduces CUDA tensors only, so the Fisher's sums,
    kept on the CPU, failed after every rank had done its gradients. The group now maps the CPU to gloo beside
    NCCL (checked without a GPU: the call is recorded, not made)."""
    from common.core import distributed

    calls = []
    monkeypatch.setattr(distributed, "launched", lambda: True)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **k: calls.append(backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.init(torch.device("cuda")) == torch.device("cuda", 1)
    assert calls == ["cuda:nccl,cpu:gloo"]
