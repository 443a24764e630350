"""What this machine computes with: CPU instruction set, native bf16 / int8 support, GPU, torch, threads.

``capability()`` is recorded beside every measurement (``metrics.json``, bench lines, ``sample.json``, release
provenance) as a plain field, never inside a fingerprint that decides reuse: a result computed elsewhere stays
valid here. ``native_bf16`` decides ``train.bf16: auto``; ``key`` names the machine in the ``backend.name: auto``
cache. On a CPU without AVX512-BF16 / AMX-BF16, torch emulates bf16 GEMMs and convolutions (measured here on
AVX2: ~40x slower than fp32), and without VNNI its int8 kernels gain nothing over fp32.
"""
import functools
import os
import platform
import resource
import sys
import time

import torch

from .process_state import per_process
from .storage import fingerprint

BF16_FLAGS = ("avx512_bf16", "amx_bf16")   # x86 flags of native bf16 dot products (/proc/cpuinfo spelling)
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")  # int8 dot products
AMX_FLAGS = ("amx_tile", "amx_bf16", "amx_int8")
ARM_BF16_FLAGS = ("bf16",)                 # aarch64 "Features": BFDOT / BFMMLA (Armv8.6)
# ONEDNN_MAX_CPU_ISA caps the instructions torch's bf16 / int8 GEMMs and convolutions may use
# (ONEDNN_MAX_CPU_ISA=AVX2 on an AVX512-BF16 CPU makes a bf16 matmul ~100x slower, measured), so a flag the cap
# excludes is not native for what runs here. With ATEN_CPU_CAPABILITY=avx2 (which ``isa`` reports) it makes such a
# host compute like an AVX2-only one: ``make test-avx2``. oneDNN's levels are bit masks, not a line: a flag is
# usable under a cap whose mask holds its bit (src/cpu/x64/cpu_isa_traits.hpp, ``mayiuse``). AVX-VNNI (the 256-bit
# encoding) is in AVX2_VNNI and from AVX512_CORE_FP16 / AVX10_1_512 on, but not in AVX512_CORE..AVX512_CORE_BF16;
# AVX10_2_512 carries no AMX bits.
_VNNI512, _BF16 = {"avx512_vnni"}, {"avx512_vnni", "avx512_bf16"}
_FP16 = _BF16 | {"avx_vnni"}
_AMX = _FP16 | {"amx_tile", "amx_int8", "amx_bf16"}
ONEDNN_CAP_FLAGS = {
    "SSE41": set(), "AVX": set(), "AVX2": set(), "AVX2_VNNI": {"avx_vnni"}, "AVX2_VNNI_2": {"avx_vnni"},
    "AVX512_CORE": set(), "AVX512_CORE_VNNI": _VNNI512, "AVX512_CORE_BF16": _BF16,
    "AVX512_CORE_FP16": _FP16, "AVX10_1_512": _FP16, "AVX512_CORE_AMX": _AMX, "AVX10_1_512_AMX": _AMX,
    "AVX512_CORE_AMX_FP16": _AMX, "AVX10_1_512_AMX_FP16": _AMX, "AVX10_2_512": _FP16, "AVX10_2_512_AMX_2": _AMX}
CAPPED_FLAGS = set().union(*ONEDNN_CAP_FLAGS.values())  # the flags a cap can take away


def _cpuinfo(path="/proc/cpuinfo") -> tuple:
    """(model name, set of flags) from ``path``; ("", empty set) where it does not exist (not Linux)."""
    name, flags = "", set()
    try:
        with open(path) as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key == "model name" and not name:
                    name = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return name, flags


def _torch_says(name: str) -> bool:
    """torch's own cpuinfo probe (``torch.cpu._is_<name>_supported``), False where this torch has none."""
    fn = getattr(torch.cpu, f"_is_{name}_supported", None)
    try:
        return bool(fn()) if fn is not None else False
    except Exception:  # a private helper: never let it break a run
        return False


def onednn_cap(environ=None):
    """The oneDNN ISA cap in force (``ONEDNN_MAX_CPU_ISA``, or its older name ``DNNL_MAX_CPU_ISA``), upper-cased,
    or None where none is set (or it is ALL / DEFAULT). An unknown value is reported as is and caps nothing."""
    env = os.environ if environ is None else environ
    value = (env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    return None if value in ("", "ALL", "DEFAULT") else value


def _allowed(flag, cap) -> bool:
    """Whether oneDNN may use ``flag``'s instructions under the ISA ``cap`` (None or unknown: no cap)."""
    if cap not in ONEDNN_CAP_FLAGS or flag not in CAPPED_FLAGS:
        return True
    return flag in ONEDNN_CAP_FLAGS[cap]


def capability(cpuinfo_path="/proc/cpuinfo", environ=None) -> dict:
    """This machine as a JSON-able dict.

    isa: torch's CPU kernel level (``torch.backends.cpu.get_cpu_capability()``: "AVX2", "AVX512", "DEFAULT", ...);
    native_bf16: the CPU has bf16 dot-product instructions (avx512_bf16 / amx_bf16; aarch64 bf16), so bf16
    kernels are not emulated; vnni: int8 dot products (avx512_vnni / avx_vnni); amx: AMX tiles; cpu: model name;
    cuda: the GPU's name or None; torch: version; threads: torch's intra-op threads now; onednn_cap: the oneDNN
    ISA cap in force (``onednn_cap``; None: none), which removes the flags above it from native_bf16 / vnni / amx
    (``flags`` stays what the CPU has).
    """
    name, flags = _cpuinfo(cpuinfo_path)
    have = lambda names: sorted(f for f in names if f in flags)  # noqa: E731
    arm = platform.machine().lower() in ("aarch64", "arm64")
    bf16 = have(BF16_FLAGS) + (have(ARM_BF16_FLAGS) if arm else [])
    vnni, amx = have(VNNI_FLAGS), have(AMX_FLAGS)
    if not flags:  # no /proc/cpuinfo: ask torch's cpuinfo instead
        bf16 = ["avx512_bf16"] if _torch_says("avx512_bf16") else []
        vnni = ["avx512_vnni"] if _torch_says("vnni") else []
        amx = ["amx_tile"] if _torch_says("amx_tile") else []
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    isa_cap = onednn_cap(environ)
    usable = lambda found: [f for f in found if _allowed(f, isa_cap)]  # noqa: E731
    return {"isa": torch.backends.cpu.get_cpu_capability(), "native_bf16": bool(usable(bf16)),
            "vnni": bool(usable(vnni)), "amx": bool(usable(amx)), "onednn_cap": isa_cap,
            "flags": bf16 + [f for f in vnni + amx if f not in bf16],
            "cpu": name or platform.processor() or platform.machine(), "cuda": cuda,
            "cuda_bf16": cuda_native_bf16(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cores": os.cpu_count()}


def describe(cap=None) -> str:
    """One line, e.g. "AMD EPYC, AVX2 (bf16 emulated, no VNNI, no AMX), 2 threads, torch 2.14.1, no CUDA"."""
    cap = cap or capability()
    bf16 = "native bf16" if cap["native_bf16"] else "bf16 emulated"
    extras = [bf16, "VNNI" if cap["vnni"] else "no VNNI", "AMX" if cap["amx"] else "no AMX"]
    if cap.get("onednn_cap"):  # records written before the field have none
        extras.append(f"oneDNN capped at {cap['onednn_cap']}")
    gpu = f"CUDA {cap['cuda']}" if cap["cuda"] else "no CUDA"
    threads = f"{cap['threads']} thread" + ("s" if cap["threads"] != 1 else "")
    return f"{cap['cpu']}, {cap['isa']} ({', '.join(extras)}), {threads}, torch {cap['torch']}, {gpu}"


def key(cap=None) -> str:
    """Short hash of what decides which kernels are fast here: ISA, bf16 / VNNI / AMX, CPU and GPU, torch, threads."""
    cap = cap or capability()
    return fingerprint({k: cap[k] for k in ("isa", "native_bf16", "vnni", "amx", "cpu", "cuda", "torch", "threads")
                       } | ({"onednn_cap": cap["onednn_cap"]} if cap.get("onednn_cap") else {}))


def cuda_native_bf16() -> bool:
    """A GPU with bf16 arithmetic units (compute capability >= 8.0). torch's ``is_bf16_supported()`` also says True
    where bf16 is only emulated (a T4 or V100: it merely creates a bf16 tensor), slower than fp16 there."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def native_bf16(device_type="cpu", cap=None) -> bool:
    """Whether bf16 kernels are native on ``device_type`` ("cpu" or "cuda") of this machine."""
    if device_type == "cuda":
        return cuda_native_bf16()
    return (cap or capability())["native_bf16"]


@functools.cache
def bf16_matmul_cost(n=256, repeats=5) -> dict:
    """A tiny timed probe: one n x n matmul in fp32 and in bf16 on this CPU (best of ``repeats`` after a warm-up);
    returns {"fp32_gflops", "bf16_gflops", "slowdown": bf16 time / fp32 time}. ~0.2 s where bf16 is emulated."""
    out = {}
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
        a @ b
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        out[label] = best
    return {"fp32_gflops": round(2 * n ** 3 / out["fp32"] / 1e9, 2),
            "bf16_gflops": round(2 * n ** 3 / out["bf16"] / 1e9, 2),
            "slowdown": round(out["bf16"] / out["fp32"], 1), "n": n}


# timed once per process (a new interpreter probes again): registered so the in-process test runner does too
per_process(bf16_matmul_cost, reset=bf16_matmul_cost.cache_clear, what="machine.bf16_matmul_cost")


def peak_rss_mb() -> float:
    """This process's own peak resident set in MB: ``VmHWM`` of /proc/self/status, which starts afresh at exec.
    ``ru_maxrss`` does not: Linux carries it across fork + exec, so a spawned child (the bench's one process per
    row) reported at least its parent's RSS. ``ru_maxrss`` only where /proc is missing (bytes on macOS, KB
    elsewhere)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024
