"""GPTQ (``common.quant.gptq``): the Hessian proxy is the layer's real output error, GPTQ's rounding lowers it
against round-to-nearest, and what it stores is an ordinary per-channel integer entry."""
import pytest
import torch
from torch import nn

from common.core.format_names import format_spec
from common.quant import gptq
from common.quant.formats import dequantize_tensor, expand_group_scale, int_codes, quantize_tensor


def _correlated(shape, seed=0):
    """Inputs whose channels share a common component and differ in scale: where GPTQ has something to use."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x = x + 0.7 * x[:, :1]
    x[:, 2] *= 6.0
    return x


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0)])
def test_hessian_proxy_is_the_convs_output_error(stride, padding):
    """tr(dW H dW^T) with H from the unfolded patches equals the conv's summed squared output error per patch
    row: F.unfold's patch order is the weight's (C_in, kh, kw) order (float64 arithmetic: 1e-9 relative)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(6, 10, 3, stride=stride, padding=padding))
    x = _correlated((4, 6, 9, 9)).double()
    net = net.double()
    H = gptq.collect_hessians(net, ["0"], lambda: net(x))["0"]
    dw = torch.randn_like(net[0].weight) * 0.01
    out = nn.functional.conv2d(x, dw, None, stride, padding)
    rows = out.shape[0] * out.shape[2] * out.shape[3]
    assert gptq.output_error(dw.reshape(10, -1), H) == pytest.approx(float(out.pow(2).sum()) / rows, rel=1e-9)


def test_linear_hessian_counts_token_rows():
    net = nn.Sequential(nn.Linear(5, 3)).double()
    x = torch.randn(2, 7, 5, dtype=torch.float64)
    H = gptq.collect_hessians(net, ["0"], lambda: net(x))["0"]
    rows = x.reshape(-1, 5)
    assert torch.allclose(H, rows.T @ rows / 14, rtol=1e-12)


def test_hessian_sees_the_input_after_earlier_hooks():
    """A pre-hook registered before (a smoothing divisor) changes what the weight multiplies: H must be of that."""
    net = nn.Sequential(nn.Linear(4, 2)).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    net[0].register_forward_pre_hook(lambda m, a: (a[0] * 3.0,))
    H = gptq.collect_hessians(net, ["0"], lambda: net(x))["0"]
    assert torch.allclose(H, 9.0 * x.T @ x / 8)


@pytest.mark.parametrize("fmt", ["int4", "int3", "int2", "int3_g32", "int2_g16", "int2m", "int3m_g32"])
def test_gptq_lowers_the_output_error_of_round_to_nearest(fmt):
    torch.manual_seed(1)
    conv = nn.Conv2d(12, 16, 3, padding=1)
    net = nn.Sequential(conv)
    x = _correlated((6, 12, 10, 10))
    H = gptq.collect_hessians(net, ["0"], lambda: net(x))["0"]
    entry, info = gptq.gptq_entry(conv.weight, fmt, H)
    rtn = quantize_tensor(conv.weight, fmt, 0)  # what formats stores without GPTQ: max|w| / qmax scales
    w = conv.weight.detach().reshape(16, -1)
    assert info["rtn_error"] == pytest.approx(gptq.output_error(w - dequantize_tensor(rtn).reshape(16, -1), H))
    assert info["gptq_error"] == pytest.approx(gptq.output_error(w - dequantize_tensor(entry).reshape(16, -1), H))
    assert info["gptq_error"] < 0.9 * info["rtn_error"]
    spec = format_spec(fmt)
    codes = int_codes(entry)  # stored: -qmax..qmax, or a midrise level's k in -2^(b-1) .. 2^(b-1) - 1
    assert (codes + spec.offset).abs().max() <= spec.qmax and entry["shape"] == tuple(conv.weight.shape)
    assert entry["scale"].shape == rtn["scale"].shape and entry["scale"].dtype == rtn["scale"].dtype
    scale = expand_group_scale(entry["scale"], 32 if "g32" in fmt else 16, 108) if "_g" in fmt else \
        entry["scale"][:, None]
    assert torch.equal(dequantize_tensor(entry), ((codes.float() + spec.offset) * scale).reshape(conv.weight.shape))


def test_gptq_on_the_midrise_grid_beats_the_symmetric_grid_at_equal_bits():
    """int2 stores ternary values in 2 bits; int2m's four levels (k + 1/2) s use every code: at the same stored
    bits GPTQ's layer-output error is far lower (here about half; the released U-Net's tensors: median 0.45 at 2
    bits, 0.73 at 3, docs/lowbit.md)."""
    torch.manual_seed(1)
    conv = nn.Conv2d(12, 16, 3, padding=1)
    net = nn.Sequential(conv)
    x = _correlated((6, 12, 10, 10))
    H = gptq.collect_hessians(net, ["0"], lambda: net(x))["0"]
    for sym, mid in (("int2", "int2m"), ("int3_g32", "int3m_g32")):
        (a, ia), (b, ib) = gptq.gptq_entry(conv.weight, sym, H), gptq.gptq_entry(conv.weight, mid, H)
        assert ib["gptq_error"] < 0.85 * ia["gptq_error"], (sym, ib["gptq_error"] / ia["gptq_error"])
        assert a["data"].numel() == b["data"].numel() and a["scale"].shape == b["scale"].shape


@pytest.mark.parametrize("fmt", ["int4", "int3_g16", "int2m"])
def test_without_correlation_gptq_is_round_to_nearest(fmt):
    """H = I (independent, equal inputs): no column can absorb another's error, so GPTQ stores exactly what
    round-to-nearest stores."""
    w = torch.randn(8, 40)
    entry, info = gptq.gptq_entry(w, fmt, torch.eye(40, dtype=torch.float64), damp=1e-6)
    rtn = quantize_tensor(w, fmt, 0)
    assert torch.equal(entry["data"], rtn["data"]) and torch.equal(entry["scale"], rtn["scale"])
    assert info["ratio"] == pytest.approx(1.0)


def test_dead_inputs_and_what_gptq_does_not_cover():
    w = torch.randn(4, 6)
    H = torch.diag(torch.tensor([1.0, 0.0, 2.0, 0.0, 1.0, 3.0], dtype=torch.float64))  # two inputs never nonzero
    entry, _ = gptq.gptq_entry(w, "int4", H)
    assert int_codes(entry).abs().max() <= 7
    assert gptq.supports(nn.Linear(3, 3), "int4") and gptq.supports(nn.Conv2d(3, 3, 3), "int3_g64")
    assert not gptq.supports(nn.ConvTranspose2d(3, 3, 2), "int4")
    assert not gptq.supports(nn.Conv2d(4, 4, 3, groups=2), "int4")
    assert not gptq.supports(nn.Linear(3, 3), "km4") and not gptq.supports(nn.Linear(3, 3), "fp16")
    with pytest.raises(ValueError, match="Hessian"):
        gptq.gptq_entry(w, "int4", torch.eye(5, dtype=torch.float64))
