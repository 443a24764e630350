"""Sub-4-bit weight formats: int3/int2 per channel, group-wise int4/int3/int2, k-means codebooks. Round trips
within the format's error bound, packing (odd element counts included), exact sizes, the container, and clear
errors for unknown formats and impossible group sizes."""
import math

import pytest
import torch

from common.core.format_names import bits_of, format_spec
from common.quant.container import read_quantized, save_quantized
from common.quant.formats import (
    dequantize_tensor,
    entry_bits,
    int_codes,
    kmeans_1d,
    pack_codes,
    pack_signed,
    quantize_tensor,
    scale_groups,
    size_report,
    unpack_codes,
    unpack_int4,
    unpack_signed,
)

INT = ["int3", "int2"]
GROUPED = ["int4_g32", "int3_g64", "int2_g128", "int4_g16"]
CODEBOOK = ["km4", "km3", "km2", "km4t", "km3t", "km2t"]
SHAPES = [((12, 5, 3, 3), 0), ((7, 9), 0), ((6, 10, 4, 4), 1), ((13,), 0), ((5, 67), 0)]  # odd sizes, 1-D


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 7])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 17, 1001])
def test_pack_codes_round_trip_and_length(bits, n):
    u = torch.randint(0, 2 ** bits, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.int64).to(
        torch.uint8)
    packed = pack_codes(u, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack_codes(packed, n, bits), u)


def test_pack_codes_layout_and_int4_unchanged():
    # 3-bit codes 5, 3: bits 101 then 011, little-endian stream -> byte 0b00011101
    assert pack_codes(torch.tensor([5, 3], dtype=torch.uint8), 3).tolist() == [0b00011101]
    # int4 keeps its layout (two per byte, low nibble first), so older files read the same
    assert pack_signed(torch.tensor([-8, 7], dtype=torch.int8), 4).tolist() == [0xF0]
    assert torch.equal(unpack_int4(pack_signed(torch.tensor([-1, 2, 3], dtype=torch.int8), 4), 3),
                       torch.tensor([-1, 2, 3], dtype=torch.int8))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_signed_codes_pack_as_offset_binary_for_every_caller(bits):
    """``pack_signed`` is what the per-channel, group-wise and learned exports wrote by hand before: pack_codes of
    code + 2^(b-1), from int8 codes or from the integral float codes of the group-wise path."""
    q = 2 ** (bits - 1)
    codes = torch.randint(-q, q, (37,), generator=torch.Generator().manual_seed(bits), dtype=torch.int8)
    want = pack_codes((codes.to(torch.int16) + q).to(torch.uint8), bits)
    assert torch.equal(pack_signed(codes, bits), want) and torch.equal(pack_signed(codes.float(), bits), want)
    assert torch.equal(pack_signed(codes.view(37, 1), bits), want)  # any shape: flattened
    assert torch.equal(unpack_signed(want, 37, bits), codes)


@pytest.mark.parametrize("fmt", INT)
@pytest.mark.parametrize("shape, axis", SHAPES)
def test_int3_int2_per_channel_error_bound(fmt, shape, axis):
    w = rand(*shape, seed=1) * (torch.logspace(-2, 1, shape[axis]).view(
        [-1 if i == axis else 1 for i in range(len(shape))]) if len(shape) > 1 else 1)
    e = quantize_tensor(w, fmt, axis)
    spec = format_spec(fmt)
    deq = dequantize_tensor(e)
    assert deq.shape == w.shape
    codes = int_codes(e)
    assert codes.abs().max() <= spec.qmax
    C = scale_groups(w.shape, axis)
    step = e["scale"].view(C, 1)
    cf = w.movedim(axis, 0).reshape(C, -1)
    dcf = deq.movedim(axis, 0).reshape(C, -1)
    assert torch.all((cf - dcf).abs() <= step / 2 + 1e-6 * step)  # round to nearest: half a step
    assert torch.equal(dcf, codes.float() * step)  # dequant reproduces codes x scale exactly
    assert e["data"].numel() == math.ceil(w.numel() * spec.bits / 8)


@pytest.mark.parametrize("fmt", GROUPED)
@pytest.mark.parametrize("shape, axis", SHAPES)
def test_group_scales_fp16_per_group_of_inputs(fmt, shape, axis):
    w = rand(*shape, seed=2)
    w.view(-1)[::5] *= 30  # outliers: a per-channel scale would be coarse for the rest of the row
    spec = format_spec(fmt)
    e = quantize_tensor(w, fmt, axis)
    C = scale_groups(w.shape, axis)
    K = w.numel() // C
    G = -(-K // spec.group)
    assert e["scale"].dtype == torch.float16 and tuple(e["scale"].shape) == (C, G)
    deq = dequantize_tensor(e)
    step = e["scale"].float().repeat_interleave(spec.group, dim=1)[:, :K]
    cf = w.movedim(axis, 0).reshape(C, -1)
    dcf = deq.movedim(axis, 0).reshape(C, -1)
    assert torch.all((cf - dcf).abs() <= step / 2 * (1 + 2 ** -9) + 1e-7)  # fp16 scale rounding allowed for
    assert int_codes(e).abs().max() <= spec.qmax
    assert entry_bits(w.numel(), C, fmt) == 8 * e["data"].numel() + 16 * C * G


def test_group_scales_beat_per_channel_on_outliers():
    w = rand(16, 256, seed=3)
    w[:, ::37] *= 25
    per_channel = (w - dequantize_tensor(quantize_tensor(w, "int3"))).pow(2).sum()
    grouped = (w - dequantize_tensor(quantize_tensor(w, "int3_g32"))).pow(2).sum()
    assert grouped < per_channel


@pytest.mark.parametrize("fmt", CODEBOOK)
@pytest.mark.parametrize("shape, axis", SHAPES)
def test_codebook_round_trip(fmt, shape, axis):
    w = rand(*shape, seed=4)
    spec = format_spec(fmt)
    e = quantize_tensor(w, fmt, axis)
    C = scale_groups(w.shape, axis)
    rows = 1 if spec.per_tensor else C
    assert e["codebook"].dtype == torch.float16 and tuple(e["codebook"].shape) == (rows, 2 ** spec.bits)
    deq = dequantize_tensor(e)
    assert deq.shape == w.shape
    cf = w.movedim(axis, 0).reshape(C, -1)
    dcf = deq.movedim(axis, 0).reshape(C, -1)
    book = e["codebook"].float()
    for c in range(C):  # every value is a stored centroid of its row, and the nearest one
        b = book[0 if spec.per_tensor else c]
        assert set(dcf[c].tolist()) <= set(b.tolist())
        nearest = b[(cf[c][:, None] - b[None]).abs().argmin(1)]
        assert torch.equal(dcf[c], nearest)
    assert e["data"].numel() == math.ceil(w.numel() * spec.bits / 8)
    assert entry_bits(w.numel(), C, fmt) == 8 * e["data"].numel() + 16 * rows * 2 ** spec.bits


def test_kmeans_is_deterministic_and_at_least_as_good_as_uniform_levels():
    x = torch.cat([rand(1, 500, seed=5) * 0.1, rand(1, 50, seed=6) * 2], dim=1).double()
    c1, c2 = kmeans_1d(x, 8), kmeans_1d(x, 8)
    assert torch.equal(c1, c2) and torch.all(c1[0, 1:] > c1[0, :-1])
    err = (x[0, :, None] - c1[0]).abs().min(1).values.pow(2).sum()
    uniform = torch.linspace(float(x.min()), float(x.max()), 8, dtype=torch.float64)
    assert err < (x[0, :, None] - uniform).abs().min(1).values.pow(2).sum()


def test_kmeans_leaves_no_code_unused_and_never_a_larger_error():
    """Rows little longer than the codebook (an attention projection's 32 inputs, 16 codes) end Lloyd's plain rule
    with empty clusters: codes no value uses. Each moves to a value of its own and Lloyd resumes on its row, so
    every code is used, the row's error falls, no row's error grows and rows without an empty cluster keep their
    centroids; a row with fewer values than codes is reproduced exactly."""
    from common.quant.formats import _lloyd

    x = rand(64, 32, seed=11).double()
    plain = _lloyd(x, torch.quantile(x, torch.linspace(0, 1, 33, dtype=x.dtype)[1::2], dim=1).T.contiguous(), 30)
    c = kmeans_1d(x, 16)

    def row_errors(book):
        return (x[:, :, None] - book[:, None, :]).abs().min(-1).values.pow(2).sum(1)

    def counts(book):
        return torch.nn.functional.one_hot((x[:, :, None] - book[:, None, :]).abs().argmin(-1), 16).sum(1)

    had_empty = (counts(plain) == 0).any(1)
    assert had_empty.sum() >= 3  # the case this is about
    assert (counts(c) > 0).all()
    assert torch.all(row_errors(c) <= row_errors(plain) + 1e-15)
    assert torch.all(row_errors(c)[had_empty] < row_errors(plain)[had_empty])
    assert torch.equal(c[~had_empty], plain[~had_empty].sort(dim=1).values)
    nine = rand(1, 9, seed=12).double()
    book = kmeans_1d(nine, 16)
    assert torch.equal((nine[0, :, None] - book[0]).abs().min(1).values, torch.zeros(9, dtype=torch.float64))


@pytest.mark.parametrize("fmt", ["int8", "int4"] + INT + GROUPED + CODEBOOK)
def test_errors_shrink_with_bits_and_container_round_trip(fmt, tmp_path):
    w = rand(24, 18, 3, 3, seed=7)
    stored = {"w": quantize_tensor(w, fmt), "b": {"format": "fp32", "data": rand(24, seed=8)}}
    rep = save_quantized(stored, str(tmp_path / "q.safetensors"), {"model": {}, "timesteps": 1}, {"p": 1})
    assert rep["stored_bytes"] == rep["analytic_bytes"]  # scales and codebooks counted exactly
    assert rep["file_bytes"] == rep["header_bytes"] + rep["stored_bytes"]
    back = read_quantized(str(tmp_path / "q.safetensors"))["tensors"]
    assert torch.equal(dequantize_tensor(back["w"]), dequantize_tensor(stored["w"]))
    assert size_report(stored)["analytic_bytes"] == rep["analytic_bytes"]


def test_more_bits_less_error():
    w = rand(32, 64, 3, 3, seed=9)

    def err(f):
        return float((w - dequantize_tensor(quantize_tensor(w, f))).pow(2).sum())
    assert err("int2") > err("int3") > err("int4") > err("int8")
    assert err("km2") > err("km3") > err("km4")
    assert err("km3") < err("int3")  # a fitted codebook beats uniform levels at equal bits on Gaussian weights


def test_format_errors_name_the_value_and_what_is_valid():
    with pytest.raises(ValueError, match=r"unknown format 'int5'.*int3.*km4"):
        format_spec("int5")
    with pytest.raises(ValueError, match=r"group size 48 is not possible.*32"):
        format_spec("int4_g48")
    with pytest.raises(ValueError, match=r"group size"):
        format_spec("int8_g64")
    with pytest.raises(ValueError, match="element masks"):
        quantize_tensor(rand(4, 4), "int3", mask=torch.ones(4, 4, dtype=torch.bool))
    assert bits_of("int3_g64") == 3 and bits_of("km2t") == 2 and bits_of("fp32") == 32


@pytest.mark.parametrize("fmt", ["int2m", "int3m", "int4m", "int2m_g64", "int3m_g32"])
def test_midrise_formats_use_every_code_at_the_same_stored_bits(fmt):
    """int<b>m: levels (k + 1/2) x scale for the stored k in -2^(b-1) .. 2^(b-1) - 1 (all 2^b codes; the symmetric
    grid leaves one unused: int2 is ternary), scale max|w| / (2^(b-1) - 1/2); every element within half a step;
    the same stored bits as the symmetric format and a lower error on Gaussian weights."""
    spec, sym = format_spec(fmt), fmt.replace("m", "", 1)
    assert spec.midrise and spec.bits == format_spec(sym).bits and spec.group == format_spec(sym).group
    assert spec.qmax == 2 ** (spec.bits - 1) - 0.5 and spec.offset == 0.5
    w = rand(24, 256, seed=3)
    e = quantize_tensor(w, fmt, 0)
    k = int_codes(e)
    assert sorted(torch.unique(k).tolist()) == list(range(-2 ** (spec.bits - 1), 2 ** (spec.bits - 1)))
    scale = e["scale"].float().repeat_interleave(spec.group, 1) if spec.group else e["scale"][:, None]
    out = dequantize_tensor(e)
    assert torch.equal(out, (k.float() + 0.5) * scale)
    assert ((out - w).abs() <= scale / 2 * (1 + 1e-6)).all()
    assert entry_bits(w.numel(), 24, fmt) == entry_bits(w.numel(), 24, sym)
    assert (out - w).pow(2).mean() < 0.9 * (dequantize_tensor(quantize_tensor(w, sym, 0)) - w).pow(2).mean()


def test_midrise_names_refuse_what_they_cannot_be():
    for bad in ("int8m", "int8m_g64", "int2m_g48", "int2mm"):
        with pytest.raises(ValueError, match="int4m, int3m, int2m|midrise|group size"):
            format_spec(bad)
    with pytest.raises(ValueError, match="element masks"):
        quantize_tensor(rand(4, 8), "int4m", 0, mask=torch.ones(4, 8, dtype=torch.bool))
    from common.quant.learnable import WeightQuant
    with pytest.raises(ValueError, match="midrise"):
        WeightQuant(rand(4, 8), "int3m", 0, "ste")


def test_the_int8_kernel_scale_of_a_midrise_entry_makes_its_levels_exact_integers():
    from common.quant.backends import _kernel_scale
    e = quantize_tensor(rand(8, 40, seed=1), "int4m", 0)
    odd = dequantize_tensor(e) / _kernel_scale(e)[:, None]
    # within float rounding of odd integers, so the kernel's round(w / scale) gives back exactly 2k + 1
    assert (odd - odd.round()).abs().max() < 1e-4 and (odd.round().remainder(2) == 1).all()
    assert torch.equal(odd.round(), 2 * int_codes(e).float() + 1) and odd.abs().max() <= 15 + 1e-4
    assert torch.equal(_kernel_scale(quantize_tensor(rand(8, 40), "int4", 0))[:2],
                       quantize_tensor(rand(8, 40), "int4", 0)["scale"][:2])


@pytest.mark.parametrize("fmt", ["int2m", "int2m_g64", "int3m"])
def test_an_all_zero_row_on_a_midrise_grid_stays_near_zero(fmt):
    """A midrise grid has no zero level: an all-zero row or group (a DiT's zero-initialised projections) gets the
    smallest fp16 scale, so it comes back as +-2^-25, not +-0.5; GPTQ likewise."""
    from common.quant import gptq
    w = rand(4, 128, seed=2)
    w[1] = 0.0
    for e in (quantize_tensor(w, fmt, 0), gptq.gptq_entry(w, fmt, torch.eye(128, dtype=torch.float64))[0]):
        out = dequantize_tensor(e)
        assert out[1].abs().max() <= 2.0 ** -24 and (out[0] - w[0]).abs().max() < 0.5 * w[0].abs().max()
