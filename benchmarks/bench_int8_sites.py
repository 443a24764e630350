"""Which int8 activation quantizers move the samples: one calibrated W8A8 graph, each input in turn left float.

``bench.py --part int8-sites`` runs it on the smoothed uniform int8 plan of the backend table (the plan of the
int8 paired-MSE target). The int8 graph is calibrated once (``backend.calib_*``) with every input quantized,
whatever ``backend.int8_float_inputs`` says, and run uncompiled (the same int8 numerics at fp32 speed). For each
conv / linear whose input it quantizes, a copy skips that input's uint8 rounding
(``int8_sites.without_input_quantizers``: what ``backend.int8_float_inputs`` keeps float, here in fp32 and with
the other inputs' ranges of the one calibration) and samples the same noise. Each row is judged on the final
samples against fp32 on that noise, per image (paired MSE of [0, 1] pixels): the **median** over the images is
the judge, because the mean is carried by the few images that change digit (a few percent of the images hold
most of it) and does not order single sites at a few hundred images.
The noise is ``--sites-seed``: neither an evaluation seed, a backend-row seed nor the calibration's, so a set
chosen here is judged afresh by the backend rows (``--set 'backend.int8_float_inputs=[...]'``).
Beside it, each site's share of the one-step error (eps of the int8 graph against the stored weights' fp32
model on the dequant trajectories' inputs), which points elsewhere: it is not what moves the samples.
"""
import copy
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runnable as a script too
from common.core import machine, storage
from common.diffusion.samplers import build_sampler, sample
from common.diffusion.schedule import NoiseSchedule
from common.evaluation.generate import build_runner, load_weights
from common.quant import backends, int8_sites

VARIANT = "uniform_int8_smooth"
ONE_STEP_IMAGES = 16  # trajectories whose every step the one-step errors are taken on


def _per_image(x, ref) -> list:
    return (x - ref).pow(2).flatten(1).mean(1).tolist()


def study(cfg, model, stored, fp32, n: int, seed: int, batch: int, progress=True) -> dict:
    """Per-image paired MSE against ``fp32`` of ``model`` (stored values, fp32), its int8 graph and the int8 graph
    with each site's input float; one-step errors on the dequant trajectories. Returns {"dequant", "int8",
    "sites": {module: per-image list}, "one_step": {"int8": float, module: float}}."""
    from tqdm.auto import tqdm

    every = copy.deepcopy(cfg)
    every.backend.int8_float_inputs = []  # every site from the all-int8 graph, whatever the config keeps float
    gm = build_runner(every, model, stored, "int8", "cpu", batch, compile_model=False, progress=False).fn
    sampler = build_sampler(cfg.sample, NoiseSchedule.from_config(cfg.diffusion))
    shape = (cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)

    def draw(fn):
        with torch.inference_mode():
            return sample(fn, sampler, n, shape, seed, batch, progress=False).clamp(-1, 1).add(1).div(2)

    ref = draw(fp32)
    steps = backends.calibration_inputs(model, sampler, min(n, ONE_STEP_IMAGES), shape, seed)  # dequant's own
    with torch.inference_mode():
        eps = [model(x, t) for x, t in steps]

    def one_step(fn):
        with torch.inference_mode():
            return sum(float((fn(x, t) - e).pow(2).sum()) for (x, t), e in zip(steps, eps, strict=True))

    int8 = int8_sites.without_input_quantizers(gm, [])  # a plain copy: the exported graph refuses .eval()
    out = {"dequant": _per_image(draw(model), ref), "int8": _per_image(draw(int8), ref), "sites": {},
           "one_step": {"int8": one_step(int8)}}
    for site in tqdm(int8_sites.activation_sites(gm), desc="int8 sites", disable=not progress):
        g = int8_sites.without_input_quantizers(gm, [site])
        out["sites"][site] = _per_image(draw(g), ref)
        out["one_step"][site] = one_step(g)
    return out


def table(res: dict) -> list:
    """Rows sorted by the median damage with the site float, relative to the all-int8 graph's median."""
    base, mean = statistics.median(res["int8"]), sum(res["int8"]) / len(res["int8"])
    rows = [{"site": s, "median_vs_int8": statistics.median(v) / base, "mean_vs_int8": sum(v) / len(v) / mean,
             "one_step_share": 1 - res["one_step"][s] / res["one_step"]["int8"]} for s, v in res["sites"].items()]
    return sorted(rows, key=lambda r: r["median_vs_int8"])


def plot(rows: list, path: str):
    from common.experiments.report import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.18 * len(rows) + 1.5))
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [1 - r["median_vs_int8"] for r in rows], 0.4, label="final samples (median)")
    ax.barh([i - 0.2 for i in y], [r["one_step_share"] for r in rows], 0.4, label="one-step eps error")
    ax.set_yticks(list(y), [r["site"] for r in rows], fontsize=6)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel("share of the int8 graph's damage removed by keeping this input float")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def run(cfg, variant_path: str, fp32_path: str, out_dir: str, n: int, seed: int):
    """The study on ``variant_path``; prints the table, writes int8_sites.json and int8_sites.png to ``out_dir``."""
    model, stored, _ = load_weights(variant_path, cfg)
    fp32, _, _ = load_weights(fp32_path, cfg)
    batch = min(n, cfg.sample.batch_size)
    print(f"\n[int8-sites] {variant_path}: {n} images of noise seed {seed}, one calibration "
          f"({cfg.backend.calib_images} trajectories, seed {cfg.backend.calib_seed}), uncompiled int8 graph; "
          f"measured on {machine.describe()}")
    res = study(cfg, model, stored, fp32, n, seed, batch)
    rows = table(res)
    dq, i8 = statistics.median(res["dequant"]), statistics.median(res["int8"])
    print(f"paired MSE vs fp32, median over images: dequant {dq:.3g}, int8 {i8:.3g} ({i8 / dq:.2f}x); "
          f"mean: dequant {statistics.mean(res['dequant']):.3g}, int8 {statistics.mean(res['int8']):.3g}")
    print(f"{'input kept float':40s} {'median vs int8':>15s} {'mean vs int8':>13s} {'one-step share':>15s}")
    for r in rows:
        print(f"{r['site']:40s} {r['median_vs_int8']:15.3f} {r['mean_vs_int8']:13.3f} {r['one_step_share']:15.3f}")
    storage.atomic_write_json({"variant": variant_path, "n": n, "seed": seed, "per_image": res, "rows": rows},
                              os.path.join(out_dir, "int8_sites.json"))
    print(f"[int8-sites] wrote {os.path.join(out_dir, 'int8_sites.json')} and "
          f"{plot(rows, os.path.join(out_dir, 'int8_sites.png'))}")
    return rows
