"""Weight format names and what they mean: bits, kind (float / int / codebook), grouping. Parsed here, once, so
the config can validate a name (``core.config``) and the quantizers (``quant.formats``) agree with it."""
import re
from dataclasses import dataclass

GROUP_SIZES = (16, 32, 64, 128, 256)
_INT = re.compile(r"^int(8|4|3|2)(m?)(?:_g(\d+))?$")
_KM = re.compile(r"^km([234])(t?)$")
FORMAT_FORMS = ("fp16, bf16; int8, int4, int3, int2 (symmetric, one fp32 scale per output channel); int4_g64, "
                "int3_g32, ... (one fp16 scale per group of g inputs of an output channel, g in "
                f"{'/'.join(map(str, GROUP_SIZES))}); int4m, int3m, int2m, int2m_g64, ... (the same on a midrise "
                "grid: all 2^b levels (k + 1/2) s, no zero level); km4, km3, km2 (k-means codebook of 2^b fp16 "
                "centroids per output channel) and km4t, km3t, km2t (one codebook per tensor)")


@dataclass(frozen=True)
class Format:
    """How one stored tensor is laid out. kind: "float" (fp16/bf16 values), "int" (symmetric integer codes
    -qmax..qmax, or on a midrise grid levels k + 1/2, with per-channel fp32 or per-group fp16 scales) or
    "codebook" (b-bit indices into fp16 centroids per channel or per tensor)."""
    name: str
    bits: int
    kind: str
    group: int | None = None   # int: inputs per scale (None: one fp32 scale per output channel)
    per_tensor: bool = False   # codebook: one for the whole tensor
    # int: levels (k + 1/2) s for the stored k in -2^(b-1) .. 2^(b-1) - 1, every code used. The symmetric grid
    # -qmax..qmax leaves one code unused, which at 2 bits is a quarter of them: ternary values in 2 stored bits
    midrise: bool = False

    @property
    def qmax(self) -> float:
        """The largest level in units of the scale: what max|w| is divided by."""
        return 2 ** (self.bits - 1) - (0.5 if self.midrise else 1)

    @property
    def offset(self) -> float:
        """What de-quantization adds to a stored code before the scale multiplies it."""
        return 0.5 if self.midrise else 0.0


def format_spec(name: str) -> Format:
    """The ``Format`` of a format name; a ValueError naming every valid form otherwise."""
    if name in ("fp16", "bf16"):
        return Format(name, 16, "float")
    m = _INT.match(str(name))
    if m:
        group = int(m.group(3)) if m.group(3) else None
        if group is not None and (group not in GROUP_SIZES or m.group(1) == "8"):
            raise ValueError(f"format {name!r}: group size {group} is not possible; groups of "
                             f"{'/'.join(map(str, GROUP_SIZES))} inputs, for int4/int3/int2 only")
        if m.group(2) and m.group(1) == "8":
            raise ValueError(f"format {name!r}: the midrise grid is for int4/int3/int2 only; valid: {FORMAT_FORMS}")
        return Format(name, int(m.group(1)), "int", group, midrise=bool(m.group(2)))
    m = _KM.match(str(name))
    if m:
        return Format(name, int(m.group(1)), "codebook", per_tensor=bool(m.group(2)))
    raise ValueError(f"unknown format {name!r}; valid: {FORMAT_FORMS}")


def bits_of(fmt: str) -> int:
    """Nominal bits per weight (32 for fp32): what BOPs count; scales and codebooks are in ``entry_bits``."""
    return 32 if fmt == "fp32" else format_spec(fmt).bits
