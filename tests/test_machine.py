"""common.core.machine: what the CPU / GPU computes with, from /proc/cpuinfo-style flags and torch."""
import json

import pytest
import torch

from common.core import machine

AVX2 = "model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma f16c\n"
SAPPHIRE = ("model name\t: Intel(R) Xeon(R) Platinum 8480+\n"
            "flags\t\t: avx2 avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8\n")
ZEN4 = "model name\t: AMD EPYC 9654\nflags\t\t: avx2 avx512f avx512_vnni avx512_bf16\n"


def _cap(tmp_path, text):
    path = tmp_path / "cpuinfo"
    path.write_text(text + "\n" + text)  # a second core's block repeats the first
    return machine.capability(str(path), environ={})  # no oneDNN cap, whatever this process runs under


def test_flags_decide_native_bf16_vnni_and_amx(tmp_path):
    avx2, spr, zen4 = _cap(tmp_path, AVX2), _cap(tmp_path, SAPPHIRE), _cap(tmp_path, ZEN4)
    assert (avx2["native_bf16"], avx2["vnni"], avx2["amx"], avx2["flags"]) == (False, False, False, [])
    assert avx2["cpu"] == "AMD EPYC 7B13"
    assert (spr["native_bf16"], spr["vnni"], spr["amx"]) == (True, True, True)
    assert spr["flags"] == ["amx_bf16", "avx512_bf16", "avx512_vnni", "amx_int8", "amx_tile"]
    assert (zen4["native_bf16"], zen4["vnni"], zen4["amx"]) == (True, True, False)
    assert machine.native_bf16("cpu", avx2) is False and machine.native_bf16("cpu", zen4) is True


def test_a_onednn_isa_cap_removes_the_instructions_above_it(tmp_path):
    """ONEDNN_MAX_CPU_ISA=AVX2 on an AMX host makes its bf16 GEMMs emulated (~100x slower): not native then."""
    path = tmp_path / "cpuinfo"
    path.write_text(SAPPHIRE)
    cap = lambda env: machine.capability(str(path), environ=env)  # noqa: E731
    free, avx2 = cap({}), cap({"ONEDNN_MAX_CPU_ISA": "avx2"})
    assert free["onednn_cap"] is None and (free["native_bf16"], free["vnni"], free["amx"]) == (True, True, True)
    assert avx2["onednn_cap"] == "AVX2" and (avx2["native_bf16"], avx2["vnni"], avx2["amx"]) == (False, False, False)
    assert avx2["flags"] == free["flags"]  # what the CPU has is still recorded
    vnni = cap({"DNNL_MAX_CPU_ISA": "AVX512_CORE_VNNI"})  # oneDNN's older name
    assert (vnni["native_bf16"], vnni["vnni"], vnni["amx"]) == (False, True, False)
    assert cap({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"})["native_bf16"] is True
    assert cap({"ONEDNN_MAX_CPU_ISA": "ALL"}) == free and cap({"ONEDNN_MAX_CPU_ISA": "bogus"})["native_bf16"] is True
    assert "oneDNN capped at AVX2" in machine.describe(avx2) and "capped" not in machine.describe(free)
    # oneDNN's caps are masks, not a line: AVX-VNNI (256-bit) is not in AVX512_CORE's, nor AMX in AVX10_2_512's
    path.write_text(SAPPHIRE.replace("avx512_vnni", "avx512_vnni avx_vnni"))  # as Sapphire Rapids lists both
    core = cap({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"})
    assert (core["native_bf16"], core["vnni"], core["amx"]) == (False, False, False)
    assert cap({"ONEDNN_MAX_CPU_ISA": "AVX2_VNNI"})["vnni"] is True
    assert (cap({"ONEDNN_MAX_CPU_ISA": "AVX10_2_512"})["amx"], cap({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"})["amx"]
            ) == (False, True)
    assert machine.key(avx2) != machine.key(free) and machine.key(free) == machine.key({**free, "onednn_cap": None})


def test_capability_is_plain_json_with_torch_facts():
    cap = machine.capability()
    assert json.loads(json.dumps(cap)) == cap
    assert cap["isa"] == torch.backends.cpu.get_cpu_capability() and cap["torch"] == torch.__version__
    assert cap["threads"] == torch.get_num_threads() == 1  # the test conftest's one thread
    assert cap["cuda"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)


def test_describe_and_key(tmp_path):
    avx2, zen4 = _cap(tmp_path, AVX2), _cap(tmp_path, ZEN4)
    line = machine.describe(avx2)
    assert line.startswith("AMD EPYC 7B13, ") and "bf16 emulated, no VNNI, no AMX" in line and "1 thread," in line
    assert "native bf16, VNNI, no AMX" in machine.describe(zen4)
    assert machine.key(avx2) == machine.key(dict(avx2)) and machine.key(avx2) != machine.key(zen4)
    assert machine.key(avx2) != machine.key({**avx2, "threads": 2})  # backend speeds depend on the threads too


def test_no_cpuinfo_falls_back_to_torch(tmp_path):
    cap = machine.capability(str(tmp_path / "missing"), environ={})
    assert cap["native_bf16"] == bool(torch.cpu._is_avx512_bf16_supported())
    assert cap["cpu"]  # platform's name for the processor, never empty


def test_bf16_matmul_probe_is_tiny_and_positive():
    cost = machine.bf16_matmul_cost.__wrapped__(n=32, repeats=2)  # not the cached probe: tiny on any ISA
    assert cost["n"] == 32 and cost["fp32_gflops"] > 0 and cost["bf16_gflops"] > 0 and cost["slowdown"] > 0


@pytest.mark.parametrize("device", ["cuda"])
def test_native_bf16_on_cuda_asks_the_gpu(device):
    # native only: torch's default check also says True where bf16 is emulated (compute capability < 8.0)
    native = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
    assert machine.native_bf16(device) == native == machine.capability()["cuda_bf16"]


def test_emulated_bf16_on_a_gpu_is_not_native(monkeypatch):
    """torch.cuda.is_bf16_supported() says True on a T4 / V100 too (it only creates a bf16 tensor unless told
    including_emulation=False): train.bf16 auto, the bf16 backend and `auto` must not take that for native."""
    from common.quant import backends

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert machine.native_bf16("cuda") is False and machine.cuda_native_bf16() is False
    assert backends.exact_backends("bf16", "cuda") == ["dequant"]
