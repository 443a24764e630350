"""Typed, validated experiment configuration loaded from YAML.

``load_config(path, overrides)`` returns a ``Config`` dataclass. Every key is declared
here with its type and allowed range; unknown keys, wrong types and out-of-range values
raise ``ConfigError`` naming the file, the dotted key and what is allowed.
Overrides are ``"section.key=value"`` strings whose value is parsed as YAML; an error in one names
the override (``--set 'key=value'``), not the file.
"""
import copy
import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

import yaml

from .budget import (
    W_FORMAT_OF_BITS,
    normalize_budget,
    normalize_size_at_bits,
    normalize_wa_budget,
    parse_size_at_bits,
    parse_wa_budget,
)
from .errors import UserError
from .format_names import format_spec


class ConfigError(UserError, ValueError):
    """A config file, key or ``--set`` that is invalid; the message names it and what is allowed."""


def _spec(default, *, lo=None, hi=None, lo_open=False, check=None, doc=""):
    """Field with an inclusive [lo, hi] range check (``lo_open`` makes the lower bound strict) and an
    optional ``check(value) -> error text or None``."""
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "check": check, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def _plain_name(name):
    """run.name is one folder inside run.out_dir: a separator or '..' would write elsewhere."""
    if name is not None and ("/" in name or "\\" in name or name in ("", ".", "..")):
        return f"must be a plain folder name (no '/', '\\', '..'), got {name!r}; use run.out_dir for the location"
    return None


@dataclass
class RunConfig:
    name: str | None = _spec(None, check=_plain_name, doc="run directory name; defaults to the config file's stem")
    out_dir: str = "runs"
    cache_dir: str = "runs/cache"  # MNIST classifier and reference statistics, shared by runs
    device: Literal["cpu", "cuda", "auto"] = "auto"
    threads: int = _spec(0, lo=0, doc="torch CPU threads; 0 keeps torch's default")
    seed: int = 0


@dataclass
class DataConfig:
    root: str = "data"  # holds MNIST/raw/*-ubyte[.gz]; env LAQFI_DATA_ROOT overrides
    download: bool = False
    image_size: int = _spec(32, lo=28, hi=64, doc="MNIST 28x28 is zero-padded (black) to this size")
    train_limit: int | None = _spec(None, lo=1, doc="use only the first N training images")


@dataclass
class ModelConfig:
    # "unet": the poster's 6-stage U-Net (channels .. time_embedding); "dit": a Diffusion Transformer with
    # adaLN-Zero (patch_size .. mlp_ratio; num_heads and dropout shared)
    arch: Literal["unet", "dit"] = "unet"
    channels: list[int] = _spec([64, 128, 256, 512, 512, 384], lo=1)
    attentions: list[bool] = _spec([False, True, False, False, False, True])
    upscales: list[bool] = _spec([False, False, False, True, True, True])
    num_groups: int = _spec(32, lo=1)
    num_heads: int = _spec(8, lo=1)
    dropout: float = _spec(0.1, lo=0.0, hi=0.9)
    in_channels: int = _spec(1, lo=1)
    # "table": the poster's fixed sin/cos rows added to each block; "mlp": a learned MLP on them with a
    # projection per ResBlock (Ho et al.'s DDPM)
    time_embedding: Literal["table", "mlp"] = "table"
    patch_size: int = _spec(4, lo=1, doc="DiT: pixels per patch side; (image_size / patch_size)^2 tokens")
    hidden: int = _spec(128, lo=1, doc="DiT: token width")
    stage_blocks: list[int] = _spec([1, 1, 1, 1, 1, 1], lo=1,
                                    doc="DiT: transformer blocks per stage (the poster's Layer1..LayerN)")
    mlp_ratio: float = _spec(4.0, lo=0.0, lo_open=True, doc="DiT: MLP width / token width")


@dataclass
class BaselineConfig:
    # EMA weights released with the repository (common.diffusion.baseline format); null = train with `train:`
    weights: str | None = None
    sha256: str | None = None  # expected SHA-256 of `weights`; a different file is refused


@dataclass
class DiffusionConfig:
    timesteps: int = _spec(1000, lo=2)
    beta_start: float = _spec(1e-4, lo=0.0, lo_open=True, hi=0.5)
    beta_end: float = _spec(0.02, lo=0.0, lo_open=True, hi=0.999)


@dataclass
class TrainConfig:
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = _spec(2e-5, lo=0.0, lo_open=True)
    weight_decay: float = _spec(0.0, lo=0.0)
    batch_size: int = _spec(64, lo=1)
    epochs: int = _spec(15, lo=1)
    max_steps: int | None = _spec(None, lo=1, doc="stop after this many steps (overrides epochs)")
    ema_decay: float = _spec(0.9999, lo=0.0, hi=1.0)
    ema_warmup: bool = True  # decay min(ema_decay, (1+step)/(10+step)) so short runs get a usable EMA
    grad_clip: float | None = _spec(None, lo=0.0, lo_open=True)
    checkpoint_every: int = _spec(1000, lo=1)
    snapshot_every: int | None = _spec(None, lo=1, doc="also keep the EMA weights every N steps "
                                          "(baseline/snapshots/, for learning curves); null = never")
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: from lr after warm-up towards 0 at the end
    warmup_steps: int = _spec(0, lo=0, doc="linear lr warm-up steps")
    # autocast to bfloat16 for the forward pass. auto: where this machine has native bf16 kernels (AVX512-BF16 /
    # AMX, a bf16 GPU), and what an existing checkpoint or released file was trained with when checked against one
    bf16: bool | Literal["auto"] = "auto"
    min_snr_gamma: float | None = _spec(None, lo=0.0, lo_open=True,
                                           doc="Min-SNR loss weighting (faster convergence); null = plain DDPM loss")
    # A second stage of training: start the network and its EMA from a released weights file (same architecture)
    # instead of random numbers; its SHA-256 enters the training fingerprint, the path does not.
    init_from: str | None = None
    init_sha256: str | None = None
    # torch.compile the network for training (forward and backward; the optimizer stays eager). Not a training
    # input: the same recipe in another float order (with dropout > 0 inductor also draws its own masks).
    compile: bool = False


@dataclass
class SampleConfig:
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    steps: int = _spec(1000, lo=1, doc="sampling steps; ddpm requires steps == diffusion.timesteps")
    eta: float = _spec(0.0, lo=0.0, hi=1.0)
    batch_size: int = _spec(256, lo=1)
    grid_images: int = _spec(64, lo=1)
    channels_last: bool = False


@dataclass
class FisherConfig:
    n_samples: int = _spec(1024, lo=1)
    timesteps: list[int] | None = _spec(None, doc="fixed list of timesteps (0-based); null = uniform")
    chunk_size: int = _spec(16, lo=1)
    seed: int = 0
    eligible: Literal["poster", "all_weights", "all_but_ends", "all"] = "poster"
    profile_buckets: int = _spec(10, lo=1)
    # stratified: equal counts in each of the profile_buckets timestep buckets (less spread than uniform)
    timestep_sampling: Literal["stratified", "uniform"] = "stratified"
    bootstrap: int = _spec(1000, lo=0, doc="bootstrap resamples for confidence intervals; 0 = none")


def _format_name(name):
    try:
        format_spec(name)
    except ValueError as e:
        return str(e)
    return None


@dataclass
class QuantConfig:
    format: str = _spec("fp16", check=_format_name, doc="the low format of the poster's rules")
    granularity: Literal["tensor", "element"] = "tensor"


@dataclass
class WholeThresholdConfig:
    threshold: float = _spec(0.1, lo=0.0)


@dataclass
class LayerGroupConfig:
    groups: dict = _spec({
        "Layer1-2": {"layers": [1, 2], "threshold": 0.1},
        "Layer3-5": {"layers": [3, 4, 5], "threshold": 0.3},
        "Layer6": {"layers": [6], "threshold": 0.1},
    })


@dataclass
class LayerRatioConfig:
    p: list[float] = _spec([0.25])


@dataclass
class LayerMathConfig:
    alpha: float = _spec(0.5, lo=0.0)
    k_min: float = _spec(0.1, lo=0.0)
    k_max: float = _spec(2.0, lo=0.0)


@dataclass
class StrategiesConfig:
    whole_threshold: WholeThresholdConfig = field(default_factory=WholeThresholdConfig)
    layer_group: LayerGroupConfig = field(default_factory=LayerGroupConfig)
    layer_ratio: LayerRatioConfig = field(default_factory=LayerRatioConfig)
    layer_math: LayerMathConfig = field(default_factory=LayerMathConfig)


METRIC_NAMES = Literal["fisher", "fisher_distortion", "magnitude", "random", "quant_error", "orthogonality"]
FORMAT_NAMES = Literal["fp32", "fp16", "bf16", "int8", "int4"]


@dataclass
class OrthogonalityConfig:
    n_samples: int = _spec(64, lo=3, doc="calibration samples per timestep bucket")
    buckets: int = _spec(4, lo=1, doc="equal timestep buckets, sampled uniformly inside each")
    beta: float = _spec(5.0, lo=0.0, doc="importance = exp(-beta * mean CKA with the other layers)")


@dataclass
class ImportanceConfig:
    seed: int = 0  # the random control and the orthogonality calibration samples
    orthogonality: OrthogonalityConfig = field(default_factory=OrthogonalityConfig)


@dataclass
class MixedPrecisionConfig:
    metric: list[METRIC_NAMES] = _spec(["fisher_distortion"])
    # "25%" of the fp32 size, "4.5bits" average per weight, or "2.1MB" of stored weights
    budget: list[str] = _spec(["25%"])
    formats: list[FORMAT_NAMES] = _spec(["fp32", "fp16", "int8", "int4"])


@dataclass
class CompareConfig:
    metrics: list[METRIC_NAMES] = _spec(["fisher", "fisher_distortion", "orthogonality", "magnitude", "random",
                                         "quant_error"])
    budgets: list[str] = _spec(["50%", "25%", "5bits", "4.5bits", "4bits"])
    seeds: list[int] = _spec([0, 1, 2])
    n_images: int = _spec(100, lo=2, doc="images per seed (replaces eval.n_images in the comparison)")
    inception: bool = False  # FID too (~0.1 s/image on 2 CPU cores); classifier-FID is always computed
    poster_strategies: bool = True  # the poster's four rules and uniform fp16/int8/int4 on the same plot


@dataclass
class SensitivityConfig:
    budget: str = "5bits"  # of the Fisher-allocated mix evaluated on each snapshot
    n_images: int = _spec(200, lo=2, doc="images per seed (replaces eval.n_images for the snapshots)")
    seeds: list[int] = _spec([0, 1, 2])
    inception: bool = False  # FID/KID too (~0.1 s/image on 2 CPU cores); classifier metrics are always computed


@dataclass
class ActQuantConfig:
    """Weight + activation quantization (act_quant.py): candidates, calibration, the comparison grid."""
    w_formats: list[FORMAT_NAMES] = _spec(["int8", "int4"], doc="weight formats a module may take")
    a_bits: list[int] = _spec([16, 8, 6, 4], lo=2, hi=16, doc="activation bit widths a module's input may take")
    symmetric: bool = False  # asymmetric ranges use the full code range on ReLU'd (non-negative) inputs
    per_token_attention: bool = False  # attention projections' inputs: dynamic per-token ranges
    block_size: int = _spec(0, lo=0, doc="every input dynamic per block of this many input channels "
                            "(microscaling: one e4m3 scale per block, 8 / block more bits per activation); 0 = off")
    range_method: Literal["minmax", "percentile"] = "minmax"
    percentile: float = _spec(99.99, lo=50.0, hi=100.0, doc="range_method percentile: clip to [100-p, p]")
    range_modes: list[Literal["single", "group"]] = _spec(["single", "group"])  # one range, or per timestep group
    timestep_groups: int = _spec(4, lo=2, doc="groups of the 'group' range mode: t * G // T (TFMQ-style intervals)")
    keep_first_last: bool = True  # the first and last conv's inputs stay at keep_bits
    keep_bits: int | None = _spec(None, lo=2, hi=16, doc="bits of the kept inputs; null = float")
    softmax_bits: int | None = _spec(None, lo=2, hi=16, doc="attention probabilities; null = float")
    split_concat: bool = True  # skip concatenation consumers: one range per concatenated part
    calib_images: int = _spec(128, lo=1, doc="images sampled from calibration noise for the ranges")
    calib_timesteps: int | None = _spec(None, lo=1, doc="sampler timesteps recorded, spread over the "
                                           "chain; null = all")
    calib_seed: int = 1000  # calibration noise; keep it out of the evaluation seeds
    fisher_samples: int = _spec(256, lo=1, doc="(x0, t, eps) samples of the activation Fisher")
    fisher_chunk: int = _spec(32, lo=1)
    plans: list[Literal["uniform", "fisher", "magnitude", "random", "quant_error"]] = _spec(
        ["uniform", "fisher", "magnitude", "random"])
    # "W4A8": the BOPs of uniform W4A8; "1.5GBOPs"; a stored size "25%"; or "W4A8&25%"
    budgets: list[str] = _spec(["W8A8", "W4A8", "W4A6"])
    seeds: list[int] = _spec([0, 1, 2])
    n_images: int = _spec(100, lo=2, doc="images per seed (replaces eval.n_images in the comparison)")
    inception: bool = True  # FID (~0.1 s/image on 2 CPU cores); classifier-FID is always computed


@dataclass
class ClassifierConfig:
    epochs: int = _spec(3, lo=1)
    batch_size: int = _spec(128, lo=1)
    lr: float = _spec(1e-3, lo=0.0, lo_open=True)
    seed: int = 0
    train_limit: int | None = _spec(None, lo=10, doc="train on the first N images only (tests)")
    test_limit: int | None = _spec(None, lo=10, doc="report accuracy on the first N test images only (tests)")
    # the released classifier (python -m common.release_classifier wrote it), verified by SHA-256 and used on
    # every machine; null = train one here with the keys above and cache it under run.cache_dir
    weights: str | None = None
    sha256: str | None = None


@dataclass
class EvalConfig:
    n_images: int = _spec(5000, lo=2)
    seeds: list[int] = _spec([0])
    inception: bool = True  # compute FID/IS with pytorch-fid's InceptionV3
    inception_weights: str | None = None  # explicit pt_inception-2015-12-05 file
    inception_batch_size: int = _spec(50, lo=1)
    # Inception costs ~0.1 s/image on 2 CPU cores: FID/IS may use only the first N images of each seed.
    inception_n_images: int | None = _spec(None, lo=2, doc="null = eval.n_images")
    ref_n_images: int = _spec(10000, lo=2)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)


@dataclass
class BackendConfig:
    """How sample.py / the bench execute a model (common/quant/backends.py); evaluation always uses dequant."""
    # auto: the fastest backend that is exact for the plan on this machine (a short probe, cached per machine)
    name: Literal["auto", "dequant", "bf16", "fp16", "int8", "int8_bf16"] = "dequant"
    compile: bool | None = None  # torch.compile; null = only for int8 (which needs it for its int8 kernels)
    calib_images: int = _spec(32, lo=2, doc="int8: trajectories whose U-Net inputs calibrate activation scales")
    calib_steps: int = _spec(20, lo=2, doc="int8: sampler steps recorded per trajectory, spread over the chain "
                                           "(first and last included)")
    calib_seed: int = 1234  # not an evaluation seed, so calibration never sees the noise it is judged on
    # int8: activation ranges from PT2E's histogram observer (least L2 error) or per-step percentiles
    int8_ranges: Literal["histogram", "percentile"] = "histogram"
    int8_percentile: float = _spec(99.99, lo=50.0, lo_open=True, hi=100.0,
                                   doc="int8_ranges: percentile: the upper percentile of each calibration step")
    # int8: 7-bit activation codes (0..127), so CPUs without VNNI do not saturate the 16-bit pair sums of their
    # u8*s8 kernels (docs/performance.md: 6.3x lower paired MSE on AVX2); auto: true exactly where there is no VNNI
    int8_reduce_range: bool | Literal["auto"] = "auto"
    # int8: the time path's linears (one input row per image: int8 buys nothing there, and their inputs span
    # 100x between channels) run their stored weights in fp32 rather than W8A8
    int8_time_path: Literal["int8", "fp32"] = "int8"
    # int8: modules (or module prefixes) whose inputs stay float: they run their stored int8 values weight-only,
    # in a bf16 island under int8_bf16 (fp32 under int8, and for a ConvTranspose2d); bench.py --part int8-sites
    # ranks the candidates
    int8_float_inputs: list[str] = _spec([])


LOWBIT_PLANS = Literal["uniform", "fisher", "chain_fisher", "chain_output", "fisher_iterative", "learned",
                       "magnitude", "random", "search", "search_act", "search_wa", "search_interaction", "jvp"]


def _format_list(names):
    for n in names:
        err = _format_name(n)
        if err:
            return err
    return None


@dataclass
class LowbitConfig:
    """lowbit.py / make lowbit: sub-4-bit weight plans under budgets, with uniformly quantized activations."""
    budgets: list[str] = _spec(["4bits@A8", "3.5bits@A8", "3bits@A8", "3.5bits@A6"],
                               doc="weight size (average bits incl. scales and codebooks) @ activation bits")
    plans: list[LOWBIT_PLANS] = _spec(["uniform", "fisher", "chain_fisher", "fisher_iterative", "learned",
                                       "magnitude", "random", "search", "jvp"])
    quantizers: list[Literal["uniform", "codebook"]] = _spec(["uniform", "codebook"])
    codebook_plans: list[LOWBIT_PLANS] = _spec(["uniform", "fisher", "learned"],
                                               doc="plans also run with the codebook menu (each costs a variant)")
    uniform_menu: list[str] = _spec(["int8", "int4_g64", "int4", "int3_g64", "int3", "int2_g64", "int2"],
                                    check=_format_list)
    codebook_menu: list[str] = _spec(["int8", "km4", "km3", "km2"], check=_format_list)
    keep_format: str = _spec("int8", check=_format_name, doc="the first and last conv (all_but_ends rule)")
    rounding: Literal["nearest", "gptq"] = _spec("nearest", doc="integer formats rounded to nearest, or by GPTQ "
                                                 "on each layer's inputs (quant.gptq): runs/<run>/lowbit_gptq/")
    gptq_images: int = _spec(16, lo=1, doc="GPTQ's calibration: sampling trajectories whose every step's layer "
                             "inputs make each layer's Hessian (also w4a4's gptq row)")
    gptq_seed: int = 7300        # their noise: not an evaluation or measurement seed
    gptq_damp: float = _spec(0.01, lo=0.0, lo_open=True, hi=1.0, doc="GPTQ's damping, a fraction of mean(diag H)")
    range_mode: Literal["single", "group"] = "group"
    range_method: Literal["minmax", "mse"] = _spec("minmax", doc="activation ranges: min-max, or least-MSE at each "
                                                  "budget's activation bits (variants named <plan>_..._mse)")
    seeds: list[int] = _spec([0, 1, 2])
    n_images: int = _spec(100, lo=2, doc="images per seed of every variant")
    inception: bool = False
    chain_chains: int = _spec(16, lo=1, doc="chains of the chain-aware Fisher")
    chain_projections: int = _spec(32, lo=2, doc="random projections per chain batch")
    iterative_rounds: int = _spec(3, lo=1)
    predictor_configs: int = _spec(200, lo=10, doc="random configurations measured for the learned predictor")
    predictor_holdout: float = _spec(0.25, lo=0.05, hi=0.5, doc="share held out to report every predictor's tau")
    predictor_images: int = _spec(32, lo=2, doc="images per measured configuration")
    predictor_bits: list[float] = _spec([2.4, 4.5], lo=1.0, hi=16.0,
                                        doc="range of average bits the random configurations are drawn from")
    interaction_configs: int = _spec(0, lo=0, doc="random configurations measured to fit the interaction predictor "
                                     "(importance.interaction; 0 = none)")
    interaction_images: int = _spec(16, lo=1, doc="images per configuration of those measurements")
    predictor_seed: int = 7000   # calibration noise of the measurements; not an evaluation seed
    retest_seed: int = 7001      # second noise seed: the test-retest ceiling on the held-out configurations
    chain_seed: int = 7100       # the chain-aware Fisher's chains: disjoint from every measurement's noise
    predictor_floor: float = _spec(0.1, lo=0.0, lo_open=True, hi=1.0,
                                   doc="no learned cost below this share of the prior's (chain-aware Fisher) estimate")
    predictor_rounds: int = _spec(3, lo=0, doc="refits with the learned allocator's own plans, measured (0 = none)")
    predictor_alphas: list[float] = _spec([10.0, 100.0, 1000.0], lo=0.0, lo_open=True,
                                          doc="ridge strengths of the candidate fits judged by their plans' damage")
    predictor_floors: list[float] = _spec([0.1, 0.5, 1.0], lo=0.0, lo_open=True, hi=1.0,
                                          doc="floors of those candidates ([] = no selection: the cross-validated fit)")
    search_seconds: float = _spec(300.0, lo=0.0, doc="wall clock of the measured search per (menu, weight size)")
    search_evals: int = _spec(300, lo=1, doc="at most this many measured configurations per search")
    search_images: int = _spec(16, lo=2, doc="images of calibration noise per measured configuration of the search")
    search_seed: int = 7200      # the search's calibration noise: not the noise the plans are scored on
    search_probe: int = _spec(0, lo=0, doc="> 0: the search's proposer calibrated by measured one-step probes of every "
                              "tensor where the search stands, all probed again after this many rejected moves in a "
                              "row (0 = the predictor alone proposes)")
    search_statistic: Literal["mean", "geomean"] = _spec(
        "mean", doc="the weight search's fitness over its images' paired MSEs: their mean, or their geometric mean "
        "(less swayed by the few images whose chain lands on another digit)")
    search_rerank: int = _spec(0, lo=0, hi=32, doc="the search's best this many re-measured on fresh noise "
                               "(rerank_images, rerank_seed) and the best there kept: its own best is partly its "
                               "judge's luck (0 = off; at most the 32 its record keeps)")
    rerank_images: int = _spec(32, lo=2, doc="images of fresh calibration noise per re-ranked configuration")
    rerank_seed: int = 7400      # the re-ranking's noise: neither the search's, the scored plans' nor an evaluation's
    act_search_seconds: float = _spec(150.0, lo=0.0, doc="wall clock of search_wa's activation-bits search per budget")
    act_search_evals: int = _spec(150, lo=1, doc="at most this many measured configurations per activation search")
    search_start: Literal["best", "chain_fisher"] = _spec(
        "best", doc="the search's start: the plan of least fitness among every sensitivity's plans (measured on the "
        "search's own images), or always the chain-aware Fisher's")
    jvp_chains: int = _spec(2, lo=1, doc="chains of the JVP sensitivity (x_0's first-order change along the real dW)")
    eps_samples: int = _spec(64, lo=1, doc="(x_t, t) samples of the one-step noise-prediction error")
    targets: dict = _spec({"3.5bits@A8": 5.0, "3bits@A8": 15.0, "3.5bits@A6": 8.0},
                          doc="budget -> the most classifier-FID may exceed fp32's; met when the 95% interval does")


@dataclass
class FinetuneConfig:
    """finetune.py / make finetune: W/A plans recovered by reconstruction or selective finetuning."""
    budgets: list[str] = _spec(["W4A6", "W4A8"], doc="'WxAy': x-bit weights, y-bit activations (W4A4: w4a4.py's "
                               "ablation; finetuning alone reached 6.3x fp32's clf-FID there, docs/finetune.md)")
    plans: list[str] = _spec([], doc="make lowbit budgets ('3bits@A8') whose stored plan is trained: its per-tensor "
                             "formats, its codes (GPTQ's) as the start, activations at the budget's bits")
    plan_source: LOWBIT_PLANS = _spec("search", doc="which of make lowbit's plans (its stored uniform-menu variant)")
    methods: list[Literal["none", "reconstruction", "quest", "fisher", "all"]] = _spec(
        ["none", "reconstruction", "quest", "fisher", "all"])
    seeds: list[int] = _spec([0, 1, 2])
    n_images: int = _spec(100, lo=2, doc="images per seed of every variant")
    inception: bool = False
    range_mode: Literal["single", "group"] = "group"
    # noised: training images noised at uniform t (w4a4's distillation after the time table then refuses: the
    # table answers the sampler's timesteps only)
    calib_source: Literal["trajectories", "noised"] = "trajectories"
    calib_images: int = _spec(64, lo=1, doc="teacher trajectories (every sampler step is a calibration input)")
    calib_seed: int = 2000  # the teacher's calibration noise; not an evaluation seed
    steps: int = _spec(400, lo=0, doc="finetuning steps (quest, fisher, all)")
    batch_size: int = _spec(32, lo=1)
    lr: float = _spec(1e-5, lo=0.0, doc="Adam learning rate of the finetuned weights")
    step_lr: float = _spec(1e-3, lo=0.0, doc="Adam learning rate of the activation steps (LSQ)")
    local_weight: float = _spec(1.0, lo=0.0, doc="weight of the trained layers' output MSE against the teacher")
    recon_iters: int = _spec(200, lo=1, doc="AdaRound iterations per layer")
    recon_batch: int = _spec(32, lo=1)
    recon_samples: int = _spec(256, lo=1, doc="calibration inputs per layer for reconstruction")
    recon_lr: float = _spec(1e-2, lo=0.0)
    recon_lambda: float = _spec(0.01, lo=0.0, doc="weight of AdaRound's rounding regulariser (per weight)")


# The W4A4 ablation's techniques in row order (row k adds the k-th; row 0 is plain rounding); w4a4.py's TECHNIQUES
W4A4_TECHNIQUES = ("ranges", "token", "smooth", "rotate", "lowrank", "time_table", "gptq", "block", "distill")


def _average_stacks(stacks):
    usable = W4A4_TECHNIQUES[:-1]  # distill trains a uniform A4 model: not a base for mixed activation bits
    for s in stacks:
        bad = [t for t in s.split("+") if t and t not in usable] if s != "best" else []
        if bad:
            return (f"entry {s!r}: unknown technique(s) {bad}; use '', 'best' or techniques from {list(usable)} "
                    "joined by '+'")
    return None


@dataclass
class W4A4Config:
    """w4a4.py / make finetune: where uniform W4A4's damage comes from, and what each technique buys (the
    variants use finetune's budget-free settings: seeds, n_images, range_mode, calibration)."""
    studies: list[Literal["damage", "ablation", "average", "channels"]] = _spec(
        ["damage", "ablation", "average"], doc="channels: only the per-input outlier table (part of damage), seconds")
    rows: list[int] | None = _spec(None, lo=0, hi=len(W4A4_TECHNIQUES),
                                   doc="ablation rows to run (0 = plain rounding); null = all")
    ablation: Literal["greedy", "cumulative"] = "greedy"  # greedy: a technique that does not help is dropped
    select_images: int = _spec(128, lo=2, doc="images of selection noise the greedy ablation decides on (one image "
                               "that lands on another digit moves the mean paired MSE by ~0.08 / n)")
    drop_margin: float = _spec(2.0, lo=0.0, doc="greedy: a tried technique that costs nothing is dropped only when "
                               "its selection paired MSE exceeds its base's by more than this many standard errors of "
                               "the per-image difference (a tie is kept, so float noise between hosts does not decide "
                               "the path); one that stores more bytes or spends more activation bits is kept only "
                               "when lower by more than this (0: kept exactly when it lowers the damage)")
    lowrank_rank: int = _spec(8, lo=1, doc="rank of the 16-bit low-rank branch beside every quantized layer (a layer "
                              "of lower rank gets its own)")
    block_size: int = _spec(16, lo=1, doc="input channels per block of the 'block' row (NVFP4's 16; MX formats 32)")
    smooth_samples: int = _spec(1024, lo=1, doc="teacher inputs per layer for the smoothing strength search")
    distill_steps: int = _spec(1000, lo=0, doc="Adam steps of the distillation row (batch finetune.batch_size)")
    distill_lr: float = _spec(1e-4, lo=0.0, doc="learning rate of the weights and low-rank factors: codes can flip")
    scale_lr: float = _spec(1e-3, lo=0.0, doc="learning rate of the log weight scales (per output channel)")
    onpolicy_every: int = _spec(100, lo=0, doc="refresh the student's own trajectories every N steps (0 = never)")
    onpolicy_images: int = _spec(8, lo=1, doc="student trajectories per refresh (every sampler step an input)")
    average_a_bits: list[int] = _spec([3, 4, 6, 8], lo=2, hi=16,
                                      doc="activation bits the A4-on-average plans choose from (4 always included)")
    average_on: list[str] = _spec([""], check=_average_stacks,
                                  doc="what the A4-on-average plans are built on, one table block each: '' plain "
                                  "rounding, 'ranges+token+time_table' (ablation techniques joined by '+'), or "
                                  "'best': the techniques of the ablation's best row (the kept one of least "
                                  "selection damage), without distillation (needs the ablation study)")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    fisher: FisherConfig = field(default_factory=FisherConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    strategies: StrategiesConfig = field(default_factory=StrategiesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    mixed_precision: MixedPrecisionConfig = field(default_factory=MixedPrecisionConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    act_quant: ActQuantConfig = field(default_factory=ActQuantConfig)
    lowbit: LowbitConfig = field(default_factory=LowbitConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    w4a4: W4A4Config = field(default_factory=W4A4Config)
    source: str = "<defaults>"  # the YAML file this came from (not a YAML key)
    overrides: list = field(default_factory=list)  # the --set strings applied to it (not a YAML key)


NOT_YAML = ("source", "overrides")  # Config fields that record where it came from
_UNION = (typing.Union, types.UnionType)  # Optional[int] and int | None


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in _UNION:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        text = " or ".join(_describe(a) for a in inner)
        return text + " or null" if type(None) in typing.get_args(tp) else text
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string",
            dict: "a mapping"}.get(tp, str(tp))


def _convert(value, tp, where):
    """Check ``value`` against type ``tp``; return it converted (int -> float allowed)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")
    if origin in _UNION:
        if value is None and type(None) in typing.get_args(tp):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1:  # Optional[X]: X's own error, which may name an element
            return _convert(value, inner[0], where)
        for one in inner:
            try:
                return _convert(value, one, where)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin is list:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]  # "p: 0.25" means the one-element list [0.25]
        if not isinstance(value, list):
            raise bad
        return [_convert(v, typing.get_args(tp)[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        # YAML 1.1 reads "2e-3" (no dot) as a string; accept any float literal.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise bad
        return value
    raise bad


def _check_range(value, f, where):
    lo, hi, lo_open = f.metadata.get("lo"), f.metadata.get("hi"), f.metadata.get("lo_open")
    values = value if isinstance(value, list) else [value]
    for v in values:
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if v != v:  # NaN passes every comparison
            raise ConfigError(f"{where}: must be a number, got NaN")
        if v in (float("inf"), float("-inf")):  # a bound of "> 0" alone would let .inf through (lr: .inf)
            raise ConfigError(f"{where}: must be a finite number, got {v!r}")
        if lo is not None and (v < lo or (lo_open and v == lo)):
            op = ">" if lo_open else ">="
            raise ConfigError(f"{where}: must be {op} {lo}, got {v!r}")
        if hi is not None and v > hi:
            raise ConfigError(f"{where}: must be <= {hi}, got {v!r}")


def _build(cls, data, src, prefix=""):
    here = f"{src}: {prefix or 'top level'}"
    if not isinstance(data, dict):
        raise ConfigError(f"{here}: expected a mapping of keys, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in NOT_YAML}
    unknown = sorted(set(data) - set(fields), key=str)  # YAML keys may be bools or numbers ("on:", "1:")
    if unknown:
        bad = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{src}: unknown key {bad!r}; allowed here: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, src, key)
        else:
            converted = _convert(value, tp, f"{src}: {key}")
            _check_range(converted, fields[name], f"{src}: {key}")
            check = fields[name].metadata.get("check")
            if check and check(converted):
                raise ConfigError(f"{src}: {key}: {check(converted)}")
            kwargs[name] = converted
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value, where: str):
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: cannot set {dotted!r}: {p!r} is not a section")
    node[parts[-1]] = value


def _channel_example(c0: int, n: int) -> list:
    ch = [c0 * 2 ** i for i in range(n // 2)]
    ch.append(2 * ch[-1])
    for i in range(n // 2 + 1, n):
        ch.append(ch[-1] // 2 + ch[n - i])
    return ch


def _check_model(cfg: Config, src: str) -> int:
    """Architecture checks; returns the number of stages."""
    m = cfg.model
    if m.arch == "dit":
        if m.hidden % m.num_heads:
            raise ConfigError(f"{src}: model.num_heads: {m.num_heads} must divide model.hidden ({m.hidden})")
        if m.hidden % 4:
            raise ConfigError(f"{src}: model.hidden: must be a multiple of 4 (2-D sin/cos position embedding), "
                              f"got {m.hidden}")
        if cfg.data.image_size % m.patch_size:
            raise ConfigError(f"{src}: model.patch_size: {m.patch_size} must divide data.image_size "
                              f"({cfg.data.image_size})")
        return len(m.stage_blocks)
    n = len(cfg.model.channels)
    for key in ("attentions", "upscales"):
        if len(getattr(cfg.model, key)) != n:
            raise ConfigError(f"{src}: model.{key}: needs {n} entries (one per model.channels entry)")
    if n < 2 or n % 2:
        raise ConfigError(f"{src}: model.channels: needs an even number of stages (at least 2) (down half, up half)")
    ch = cfg.model.channels
    flow = ch[0]  # channels entering each stage: down stages double, up stages halve + concat skip
    for i in range(n):
        if flow != ch[i]:
            raise ConfigError(f"{src}: model.channels: Layer{i + 1} receives {flow} channels but is "
                              f"configured with {ch[i]} (down stages double: c[i+1] = 2*c[i]; up stages "
                              f"take c[i-1]/2 + the mirrored skip), e.g. {_channel_example(ch[0], n)}")
        flow = 2 * ch[i] if i < n // 2 else ch[i] // 2 + ch[n - i - 1]
    for c in cfg.model.channels:
        if c % cfg.model.num_groups:
            raise ConfigError(f"{src}: model.num_groups: {cfg.model.num_groups} must divide every channel count "
                              f"in model.channels {cfg.model.channels}")
    for i in [i for i, a in enumerate(cfg.model.attentions) if a]:
        if cfg.model.channels[i] % cfg.model.num_heads:
            raise ConfigError(f"{src}: model.num_heads: {cfg.model.num_heads} must divide channels of "
                              f"attention stage Layer{i + 1} ({cfg.model.channels[i]})")
    if cfg.data.image_size % (2 ** (n // 2)):
        raise ConfigError(f"{src}: data.image_size: must be divisible by {2 ** (n // 2)} for {n} stages")
    return n


def _check_sha(src: str, weights_key: str, weights, sha_key: str, sha):
    """A released file named by ``weights_key`` needs its 64-hex-digit SHA-256 under ``sha_key``."""
    if weights and not re.fullmatch(r"[0-9a-f]{64}", sha or ""):
        raise ConfigError(f"{src}: {sha_key}: needs the 64-hex-digit SHA-256 of {weights_key} "
                          f"({weights}; `sha256sum` prints it), got {sha!r}")


def _cross_checks(cfg: Config, src: str):
    _check_sha(src, "baseline.weights", cfg.baseline.weights, "baseline.sha256", cfg.baseline.sha256)
    _check_sha(src, "train.init_from", cfg.train.init_from, "train.init_sha256", cfg.train.init_sha256)
    if cfg.train.init_sha256 and not cfg.train.init_from:
        raise ConfigError(f"{src}: train.init_sha256 is set but train.init_from is not: name the weights file "
                          f"to start from, or drop train.init_sha256")
    clf = cfg.eval.classifier
    _check_sha(src, "eval.classifier.weights", clf.weights, "eval.classifier.sha256", clf.sha256)
    n = _check_model(cfg, src)
    if cfg.diffusion.beta_end <= cfg.diffusion.beta_start:
        raise ConfigError(f"{src}: diffusion.beta_end: must exceed diffusion.beta_start")
    if cfg.sample.sampler == "ddpm" and cfg.sample.steps != cfg.diffusion.timesteps:
        raise ConfigError(f"{src}: sample.steps: ancestral ddpm sampling needs steps == diffusion.timesteps "
                          f"({cfg.diffusion.timesteps}); use sampler: ddim for fewer steps")
    if cfg.sample.steps > cfg.diffusion.timesteps:
        raise ConfigError(f"{src}: sample.steps: must be <= diffusion.timesteps ({cfg.diffusion.timesteps})")
    if cfg.fisher.timesteps is not None:
        for t in cfg.fisher.timesteps:
            if not 0 <= t < cfg.diffusion.timesteps:
                raise ConfigError(f"{src}: fisher.timesteps: {t} outside [0, {cfg.diffusion.timesteps - 1}]")
    for p in cfg.strategies.layer_ratio.p:
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"{src}: strategies.layer_ratio.p: each p must be in [0, 1], got {p}")
    w = cfg.w4a4
    if "average" in w.studies and "best" in w.average_on and "ablation" not in w.studies:
        raise ConfigError(f"{src}: w4a4.average_on: 'best' is the ablation's best row; add 'ablation' to "
                          f"w4a4.studies (now {w.studies}) or name the techniques, e.g. 'ranges+token'")
    owner = {}  # stage -> the group that holds it
    for gname, g in cfg.strategies.layer_group.groups.items():
        key = f"{src}: strategies.layer_group.groups.{gname}"
        if not isinstance(g, dict) or set(g) != {"layers", "threshold"}:
            raise ConfigError(f"{key}: needs exactly the keys 'layers' (list of stage numbers) and 'threshold'")
        layers = _convert(g["layers"], list[int], key + ".layers")
        if not layers or any(not 1 <= k <= n for k in layers):
            raise ConfigError(f"{key}.layers: stage numbers must be in 1..{n}, got {g['layers']}")
        threshold = _convert(g["threshold"], float, key + ".threshold")
        if not math.isfinite(threshold) or threshold < 0:
            raise ConfigError(f"{key}.threshold: must be a finite number >= 0, got {g['threshold']}")
        for k in layers:  # a stage in two groups: the later group's plan would silently replace the earlier's
            if owner.setdefault(k, gname) != gname:
                raise ConfigError(f"{key}.layers: stage {k} is already in group {owner[k]!r}; each stage belongs "
                                  f"to at most one group")
        g["layers"], g["threshold"] = layers, threshold  # what the strategy reads: numbers, not YAML's strings
    if cfg.quant.granularity == "element" and cfg.quant.format not in ("fp16", "bf16", "int8", "int4"):
        raise ConfigError(f"{src}: quant.format: element granularity (bit masks) works with fp16, bf16, int8 and "
                          f"int4, got {cfg.quant.format!r}; use quant.granularity: tensor")
    lm = cfg.strategies.layer_math
    if lm.k_min > lm.k_max:
        raise ConfigError(f"{src}: strategies.layer_math.k_min: must be <= k_max ({lm.k_max}), got {lm.k_min}")
    for key, seeds in (("eval.seeds", cfg.eval.seeds), ("compare.seeds", cfg.compare.seeds),
                       ("sensitivity.seeds", cfg.sensitivity.seeds)):
        if not seeds:
            raise ConfigError(f"{src}: {key}: needs at least one seed")
    for f in dataclasses.fields(cfg):  # a seed twice samples the same images twice and counts them as two seeds
        seeds = getattr(getattr(cfg, f.name), "seeds", None)
        if isinstance(seeds, list) and len(set(seeds)) != len(seeds):
            raise ConfigError(f"{src}: {f.name}.seeds: {seeds} names a seed twice; each seed once")
    # lists a script loops over: empty, it would finish having made nothing
    for section, key in (("strategies.layer_ratio", "p"), ("mixed_precision", "metric"), ("mixed_precision", "budget"),
                         ("compare", "metrics"), ("compare", "budgets"), ("w4a4", "studies")):
        sub = cfg
        for part in section.split("."):
            sub = getattr(sub, part)
        _require_entries(section, sub, (key,), src)
    for section, key in (("mixed_precision", "budget"), ("compare", "budgets"), ("sensitivity", "budget")):
        sub = getattr(cfg, section)
        try:  # one spelling per budget, so '25 %' and '25%' name the same run folder
            value = getattr(sub, key)
            setattr(sub, key, [normalize_budget(b) for b in value] if isinstance(value, list)
                    else normalize_budget(value))
        except ValueError as e:
            raise ConfigError(f"{src}: {section}.{key}: {e}") from None
    _check_act_quant(cfg, src)
    _check_lowbit(cfg, src)
    _check_finetune(cfg, src)
    if cfg.importance.orthogonality.buckets > cfg.diffusion.timesteps:
        raise ConfigError(f"{src}: importance.orthogonality.buckets: at most diffusion.timesteps "
                          f"({cfg.diffusion.timesteps})")
    if "fp32" not in cfg.mixed_precision.formats:
        raise ConfigError(f"{src}: mixed_precision.formats: must include 'fp32' (the choice to leave a tensor alone)")


def _yaml_error(e: yaml.YAMLError) -> str:
    """One line: the parser's problem and where, without its multi-line context."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}{where}"


def parse_override(item: str):
    """``"key.sub=value"`` -> (dotted key, value parsed as YAML), checked on its own so that a bad key or
    value is blamed on the override, not on the YAML file it is applied to."""
    where = f"--set {item!r}"
    if "=" not in item:
        raise ConfigError(f"{where}: expected key.sub=value")
    key, text = item.split("=", 1)
    if not text.strip():  # YAML reads nothing as null: `run.name=` would quietly mean the default run folder
        raise ConfigError(f"{where}: no value after '='; write null for a key's default, '' for an empty string")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: value {text!r} is not valid YAML ({_yaml_error(e)}); "
                          f"quote the whole item, e.g. --set 'strategies.layer_ratio.p=[0.25, 0.5]'") from None
    alone = {}
    _set_dotted(alone, key.strip(), value, where)
    _build(Config, alone, where)  # unknown key, wrong type or range
    return key.strip(), value


def _merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(src: str, chain=()) -> dict:
    """The YAML mapping of ``src``; ``extends: other.yaml`` (relative to ``src``) is read first and
    overridden key by key, so a variant config states only what differs from its base."""
    try:
        with open(src) as fh:
            raw = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{src}: config file not found" + (f" (extended by {chain[-1]})" if chain else "")) from None
    except IsADirectoryError:
        raise ConfigError(f"{src}: is a directory; name a YAML file, e.g. configs/default.yaml") from None
    except OSError as e:
        raise ConfigError(f"{src}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{src}: not a UTF-8 text file (byte {e.start}: {e.reason}); name a YAML config") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{src}: not valid YAML: {_yaml_error(e)}") from None
    if raw is None:  # silently running the full default setup instead is never what was meant
        raise ConfigError(f"{src}: the file is empty; start from configs/smoke.yaml or configs/default.yaml")
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: top level must be a mapping of sections")
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{src}: extends: expected the file name of a base config, got {base!r}")
    base_path = os.path.normpath(os.path.join(os.path.dirname(src), base))
    if base_path in chain or base_path == os.path.normpath(src):
        raise ConfigError(f"{src}: extends: {base} makes a cycle ({' -> '.join(chain + (src, base_path))})")
    return _merge(_read_yaml(base_path, chain + (os.path.normpath(src),)), raw)


def _require_entries(section: str, values, keys, src: str):
    for key in keys:
        if not getattr(values, key):
            raise ConfigError(f"{src}: {section}.{key}: needs at least one entry")


def _normalized_budgets(section: str, values, normalize, src: str):
    try:
        values.budgets = [normalize(b) for b in values.budgets]
    except ValueError as e:
        raise ConfigError(f"{src}: {section}.budgets: {e}") from None


def _not_an_evaluation_seed(key: str, seed: int, seeds, src: str):
    if seed in seeds:
        raise ConfigError(f"{src}: {key}: {seed} is an evaluation seed; calibration noise must differ from the "
                          f"noise the variants are judged by")


# Each calibration noise of make lowbit and the noises it must not share, with the reason: a measurement on the
# noise something was fitted to, or picked by, would flatter it.
_LOWBIT_SEEDS_APART = (
    ("retest_seed", ("predictor_seed",), "the test-retest ceiling needs a second draw"),
    ("chain_seed", ("predictor_seed", "retest_seed"),
     "the chains would be the first images the damage is measured on"),
    ("search_seed", ("predictor_seed", "retest_seed", "chain_seed"),
     "the plans are scored on retest_seed's noise, and a search fitted to it would be judged on its own training data"),
    ("gptq_seed", ("predictor_seed", "retest_seed", "search_seed"),
     "GPTQ fits the weights to that noise's layer inputs, so a measurement on it would flatter them"),
    ("rerank_seed", ("predictor_seed", "retest_seed", "chain_seed", "search_seed", "gptq_seed"),
     "re-ranking on the search's own noise repeats its luck, on GPTQ's it flatters what GPTQ was fitted to, and on "
     "the scored plans' it would be judged on what it was picked by"),
)


def _check_lowbit(cfg: Config, src: str):
    lb = cfg.lowbit
    _require_entries("lowbit", lb, ("budgets", "plans", "quantizers", "seeds", "uniform_menu", "codebook_menu"), src)
    _normalized_budgets("lowbit", lb, normalize_size_at_bits, src)
    if len(lb.predictor_bits) != 2 or lb.predictor_bits[0] >= lb.predictor_bits[1]:
        raise ConfigError(f"{src}: lowbit.predictor_bits: expected [low, high] average bits, got {lb.predictor_bits}")
    for key in ("predictor_seed", *(key for key, _, _ in _LOWBIT_SEEDS_APART)):
        _not_an_evaluation_seed(f"lowbit.{key}", getattr(lb, key), lb.seeds + cfg.eval.seeds, src)
    for key, others, why in _LOWBIT_SEEDS_APART:
        if key == "rerank_seed" and not lb.search_rerank:
            continue
        if getattr(lb, key) in [getattr(lb, k) for k in others]:
            names = ", ".join(f"lowbit.{k} ({getattr(lb, k)})" for k in others)
            raise ConfigError(f"{src}: lowbit.{key}: must differ from {names}: {why}")
    if "search_wa" in lb.plans:
        for b in lb.budgets:
            a = parse_size_at_bits(b)[1]
            if a is not None and a not in cfg.act_quant.a_bits:
                raise ConfigError(f"{src}: lowbit.plans has search_wa, whose activation search starts with every "
                                  f"input at the budget's bits: {b!r} needs {a} in act_quant.a_bits "
                                  f"({cfg.act_quant.a_bits})")
    if lb.interaction_configs and "learned" not in lb.plans:
        raise ConfigError(f"{src}: lowbit.interaction_configs is {lb.interaction_configs}, but its predictor is judged "
                          f"on the learned predictor's held-out configurations: add 'learned' to lowbit.plans "
                          f"({lb.plans}) or set lowbit.interaction_configs: 0")
    if "search_interaction" in lb.plans and not lb.interaction_configs:
        raise ConfigError(f"{src}: lowbit.plans has search_interaction, whose moves the interaction predictor "
                          f"proposes, but lowbit.interaction_configs is 0: set it to the configurations to measure "
                          f"for that predictor (e.g. 1200), with 'learned' in lowbit.plans")
    searched = [p for p in ("search_act", "search_wa") if p in lb.plans]
    if searched and all(parse_size_at_bits(b)[1] is None for b in lb.budgets):
        raise ConfigError(f"{src}: lowbit.plans has {', '.join(searched)}, which search at the budget's activation "
                          f"bits, but no budget in lowbit.budgets ({lb.budgets}) names any: add '@A<bits>' "
                          f"(e.g. '3.5bits@A6')")
    lb.targets = _lowbit_targets(lb.targets, src)


def _lowbit_targets(targets: dict, src: str) -> dict:
    """{normalized budget: Δ classifier-FID >= 0}; a budget not in lowbit.budgets is not reported (no error: a
    ``--set lowbit.budgets=...`` keeps the default targets valid)."""
    out = {}
    for key, value in targets.items():
        try:
            budget = normalize_size_at_bits(str(key))
        except ValueError as e:
            raise ConfigError(f"{src}: lowbit.targets: {key!r}: {e}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ConfigError(f"{src}: lowbit.targets.{key}: expected a classifier-FID difference >= 0, got {value!r}")
        out[budget] = float(value)
    return out


def _check_finetune(cfg: Config, src: str):
    ft = cfg.finetune
    _require_entries("finetune", ft, ("methods", "seeds"), src)
    if not ft.budgets and not ft.plans:
        raise ConfigError(f"{src}: finetune.budgets: needs at least one entry (or finetune.plans one)")
    _normalized_budgets("finetune", ft, normalize_wa_budget, src)
    if ft.plan_source == "search_wa":
        raise ConfigError(f"{src}: finetune.plan_source: 'search_wa' is not trained here (finetune quantizes every "
                          f"input at the budget's bits, not at its searched ones); use 'search', its weights")
    for b in ft.budgets:
        parts = parse_wa_budget(b)
        if len(parts) != 1 or parts[0][0] != "wa" or parts[0][1][0] not in (8, 4, 3, 2):
            raise ConfigError(f"{src}: finetune.budgets: {b!r}: expected 'WxAy' with x in 8/4/3/2 (integer weight "
                              f"codes) and y the activation bits, e.g. 'W4A4'")
        if parts[0][1][1] not in cfg.act_quant.a_bits:
            raise ConfigError(f"{src}: finetune.budgets: {b!r} needs {parts[0][1][1]} in act_quant.a_bits "
                              f"({cfg.act_quant.a_bits}): the Fisher choice reads the activation Fisher at those bits")
    try:
        ft.plans = [normalize_size_at_bits(b) for b in ft.plans]
    except ValueError as e:
        raise ConfigError(f"{src}: finetune.plans: {e}") from None
    for b in ft.plans:
        a = parse_size_at_bits(b)[1]
        if a not in cfg.act_quant.a_bits:
            raise ConfigError(f"{src}: finetune.plans: {b!r} needs quantized activations ('@A<bits>') with the bits "
                              f"in act_quant.a_bits ({cfg.act_quant.a_bits}), e.g. '3bits@A8'")
    _not_an_evaluation_seed("finetune.calib_seed", ft.calib_seed, ft.seeds + cfg.eval.seeds, src)


def _check_act_quant(cfg: Config, src: str):
    aq = cfg.act_quant
    _require_entries("act_quant", aq, ("w_formats", "a_bits", "plans", "budgets", "seeds", "range_modes"), src)
    if aq.timestep_groups > cfg.diffusion.timesteps:
        raise ConfigError(f"{src}: act_quant.timestep_groups: at most diffusion.timesteps ({cfg.diffusion.timesteps})")
    _normalized_budgets("act_quant", aq, normalize_wa_budget, src)
    for b in aq.budgets:
        for kind, value in parse_wa_budget(b):
            if kind == "wa" and (W_FORMAT_OF_BITS[value[0]] not in aq.w_formats or value[1] not in aq.a_bits):
                raise ConfigError(f"{src}: act_quant.budgets: {b!r} is the BOPs of uniform W{value[0]}A{value[1]}, "
                                  f"so act_quant.w_formats ({aq.w_formats}) must hold {W_FORMAT_OF_BITS[value[0]]} "
                                  f"and act_quant.a_bits ({aq.a_bits}) must hold {value[1]}")


PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def released_path(path: str | None) -> str | None:
    """A released file named relative to the project (``checkpoints/...``) is found from any working directory:
    a relative path that does not exist here but does under the project root is taken from there."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    there = os.path.join(PROJECT_ROOT, path)
    return there if os.path.exists(there) else path


def load_config(path, overrides=()) -> Config:
    """Load ``path`` (YAML), apply ``key.sub=value`` overrides, validate, return a ``Config``."""
    src = str(path)
    raw = _read_yaml(src)
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value, f"--set {item!r}")
    cfg = _build(Config, raw, src)
    cfg.source, cfg.overrides = src, list(overrides)
    if os.environ.get("LAQFI_DATA_ROOT"):
        cfg.data.root = os.environ["LAQFI_DATA_ROOT"]
    if cfg.run.name is None:
        cfg.run.name = os.path.splitext(os.path.basename(src))[0]
    cfg.baseline.weights = released_path(cfg.baseline.weights)
    cfg.eval.classifier.weights = released_path(cfg.eval.classifier.weights)
    cfg.train.init_from = released_path(cfg.train.init_from)
    # A combination can be invalid where each value alone is fine: name the overrides too.
    _cross_checks(cfg, src + "".join(f" --set {o}" for o in overrides))
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
