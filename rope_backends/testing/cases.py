"""The conformance cases, as data (PyTorch OpInfo style).

A :class:`RopeCase` describes one call -- op, shapes, dtypes, layout, rotary_dim, cos/sin form and
broadcast, positions/cache/MRoPE, storage (strided views, fused qkv, transposes), in-place or not,
special values, backward -- and carries a readable ``name`` (the pytest id). The runner
(:mod:`rope_backends.testing.runner`) builds the tensors from it and compares a backend with the
reference bit for bit. An :class:`ErrorCase` describes one bad call (docs/contract.md, "Errors"; docs/errors.md) and the
error it must raise.

Tiers:
  ``sample_cases()``     the fast tier (CI, ``python -m rope_backends check``): every feature
  ``interp_cases()``     a small, still feature-complete subset for slow targets (the Triton
                         interpreter on CPU); which targets use it is data: ``REDUCED_TIERS``
  ``reference_cases()``  the exhaustive tier (``--full``): the cross products
  ``error_cases()``      the bad-input catalogue

Device-bound cases (``device="cuda"`` for >2**31 elements, ``"cuda:1"`` for a second GPU) carry
the marks ``gpu``/``multigpu`` and run only where such devices exist.

This module holds data and the rules that keep it valid; it must not run any backend.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import torch

__all__ = [
    "RopeCase",
    "ErrorCase",
    "ErrorCall",
    "sample_cases",
    "interp_cases",
    "reference_cases",
    "error_cases",
    "cases_for",
    "REDUCED_TIERS",
    "DTYPES",
    "WHY",
]

OPS = ("apply", "apply_qk", "apply_cached")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int64": "i64", "int32": "i32"}
COS_BCASTS = ("token", "batch", "head", "full", "scalar", "ones", "expanded", "strided", "transposed")
VALUES = ("normal", "special", "special_cos")
MROPE_KINDS = ("chunked", "interleaved", "ernie")


@dataclass(frozen=True)
class RopeCase:
    """One conformance call. Shapes are logical (as the user passes them).

    op           "apply" | "apply_qk" | "apply_cached"
    shape        q (or x): ``[..., H, D]``; ``[B, H, S, D]`` with ``heads_axis=-3``;
                 ``[T, H*D]`` when ``head_dim`` is given (apply_cached, vLLM style)
    dtype        of q/k/x: float32 | float16 | bfloat16
    layout       neox | interleaved
    rotary_dim   None (= head_dim) or an even value < head_dim
    head_dim     only for the 2-D ``[T, H*D]`` form (passed as ``head_dim=``)
    heads_axis   where the head dim is (-2, or -3 for ``[B, H, S, D]``)
    k_heads      k's head count (GQA/MQA); None: q's; 0: ``k=None`` (apply_cached)
    cos_form     "half" ``[.., r/2]`` | "dup" ``[.., r]`` (HF / diffusers duplicated form)
    cos_dtype    dtype of cos/sin, or of the cache for apply_cached
    cos_bcast    shape of cos/sin relative to x: token (one row per token, broadcast over heads
                 and batch), batch, head, full, scalar ([r/2]), ones ([1,..,1,r/2]), expanded
                 (stride-0 view of the full shape), strided (a slice of a bigger table),
                 transposed (the last two dims stored swapped)
    positions_dtype, mrope (kind, sections), mrope_rows (3: ``[3, *lead]``; 1: text-only),
    max_position  apply_cached's positions and cache
    storage      make.STORAGES: contiguous | offset | transposed | permuted | padded_rows |
                 strided_last | expanded | fused_qkv
    inplace      write into the inputs (canary around them must stay untouched); otherwise the
                 inputs must stay untouched
    values       normal | special (x holds +-0, subnormals, +-inf, NaN, largest finite) |
                 special_cos (cos/sin or cache hold them)
    backward     also check autograd: grad == reference rotation by -theta of the upstream grad
    device       None (the target's device) or a device this case needs ("cuda", "cuda:1")
    marks        pytest marks ("gpu", "multigpu", "large")
    """

    op: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    layout: str = "neox"
    rotary_dim: int | None = None
    head_dim: int | None = None
    heads_axis: int = -2
    k_heads: int | None = None
    cos_form: str = "half"
    cos_dtype: str = "float32"
    cos_bcast: str = "token"
    positions_dtype: str = "int64"
    mrope: tuple[str, tuple[int, int, int]] | None = None
    mrope_rows: int = 3
    max_position: int = 64
    storage: str = "contiguous"
    inplace: bool = False
    values: str = "normal"
    backward: bool = False
    device: str | None = None
    marks: tuple[str, ...] = ()
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "marks", tuple(self.marks))
        self._validate()
        object.__setattr__(self, "name", self._name())

    @property
    def kernel_group(self) -> tuple:
        """What picks a compiled kernel variant in a backend that compiles one per dtype and
        option (Triton): op, dtypes, layout, direction. ``check --shard`` keeps a group in one
        process, so each variant compiles once -- on a GPU the exhaustive tier is bound by
        compiling ~2,200 variants, not by running them."""
        return (self.op, self.dtype, self.cos_dtype, self.positions_dtype, self.layout, self.backward)

    # ---- derived geometry -------------------------------------------------------------------

    @property
    def flat(self) -> bool:
        return self.head_dim is not None

    @property
    def d(self) -> int:
        return self.head_dim if self.flat else self.shape[-1]

    @property
    def rd(self) -> int:
        return self.rotary_dim if self.rotary_dim is not None else self.d

    @property
    def heads(self) -> int:
        if self.flat:
            return self.shape[-1] // self.head_dim
        return self.shape[self.heads_axis] if len(self.shape) >= -self.heads_axis else 1

    def q_shape(self) -> tuple[int, ...]:
        return self.shape

    def k_shape(self) -> tuple[int, ...] | None:
        if self.op == "apply" or self.k_heads == 0:
            return None
        kh = self.heads if self.k_heads is None else self.k_heads
        s = list(self.shape)
        if self.flat:
            s[-1] = kh * self.head_dim
        else:
            s[self.heads_axis] = kh
        return tuple(s)

    def lead(self) -> tuple[int, ...]:
        """Token dims (positions shape) for apply_cached: q's shape without heads and head_dim."""
        return self.shape[:-1] if self.flat else self.shape[:-2]

    def cos_shape(self) -> tuple[int, ...]:
        """Logical cos/sin shape (before the dup form doubles the last dim)."""
        full = list(self.shape[:-1])
        n = len(full)
        heads = n + 1 + self.heads_axis if n >= -self.heads_axis - 1 else None  # index into full
        token = None
        if n:
            token = (heads + 1 if self.heads_axis == -3 else heads - 1) if heads is not None else n - 1
            if token is not None and not (0 <= token < n):
                token = None
        b = self.cos_bcast
        if b in ("full", "expanded"):
            keep = set(range(n))
        elif b in ("token", "strided", "transposed"):
            keep = {token} if token is not None else set()
        elif b == "batch":
            keep = set(range(n)) - ({heads} if heads is not None else set())
        elif b == "head":
            keep = {heads} if heads is not None else set()
        else:  # scalar, ones
            keep = set()
        shape = [s if i in keep else 1 for i, s in enumerate(full)]
        if b not in ("ones", "batch", "expanded", "full"):
            while shape and shape[0] == 1:
                shape.pop(0)
        return (*shape, self.rd // 2)

    # ---- validity and naming ----------------------------------------------------------------

    def _validate(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"RopeCase: {msg} ({self!r})")

        if self.op not in OPS:
            bad(f"op must be one of {OPS}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            bad("dtype must be float32, float16 or bfloat16")
        if self.cos_dtype not in DTYPES:
            bad(f"cos_dtype must be one of {tuple(DTYPES)}")
        if self.layout not in ("neox", "interleaved"):
            bad("layout must be neox or interleaved")
        if self.flat and (self.op != "apply_cached" or len(self.shape) != 2 or self.shape[1] % self.head_dim):
            bad("head_dim= is for apply_cached with q [T, H*D]")
        if self.rd % 2 or self.rd < 2 or self.rd > self.d:
            bad("rotary_dim must be even, >= 2, <= head_dim")
        if self.cos_form not in ("half", "dup") or self.cos_bcast not in COS_BCASTS:
            bad("unknown cos form or broadcast")
        if self.values not in VALUES:
            bad(f"values must be one of {VALUES}")
        if self.storage == "expanded" and (self.inplace or not self.shape or self.shape[0] < 2):
            bad("an expanded view (stride 0) is only valid out of place, with shape[0] > 1")
        if self.storage in ("transposed",) and len(self.shape) < 3:
            bad("transposed storage needs >= 3 dims")
        if self.storage == "fused_qkv" and len(self.shape) < 2:
            bad("fused_qkv storage needs a head dim")
        if self.inplace and self.backward:
            bad("backward needs inplace=False")
        if self.op == "apply_cached":
            if len(self.shape) < (2 if self.flat else 3):
                bad("apply_cached needs [T, H*D] or [..., T, H, D]")
            if self.heads_axis != -2 or self.cos_form != "half" or self.cos_bcast != "token":
                bad("apply_cached takes no cos/sin form or [B,H,S,D] layout")
            if self.mrope is not None:
                kind, sec = self.mrope
                if kind not in MROPE_KINDS or len(sec) != 3 or sum(sec) != self.rd // 2:
                    bad("mrope sections must sum to rotary_dim // 2")
                if kind == "ernie" and sec[0] != sec[1]:
                    bad("ernie needs equal h and w sections")
            if self.mrope_rows not in (1, 3):
                bad("mrope_rows must be 1 or 3")
        else:
            if self.mrope is not None or self.k_heads == 0:
                bad("mrope and k=None are apply_cached options")
            if self.op == "apply_qk" and self.k_heads not in (None, self.heads) and self.cos_bcast in ("head", "full", "expanded"):
                bad("a per-head cos cannot broadcast to a k with another head count")
        if self.device not in (None, "cuda", "cuda:1"):
            bad("device must be None, 'cuda' or 'cuda:1'")

    def _name(self) -> str:
        if self.flat:
            geo = f"{self.shape[0]}x{self.heads}x{self.head_dim}flat"
        else:
            geo = "x".join(map(str, self.shape)) + ("bhsd" if self.heads_axis == -3 else "")
        parts = [self.op, geo, _SHORT[self.dtype], self.layout]
        if self.rotary_dim is not None:
            parts.append(f"r{self.rotary_dim}")
        if self.op != "apply":
            if self.k_heads == 0:
                parts.append("knone")
            elif self.k_heads is not None:
                parts.append(f"hk{self.k_heads}")
        if self.op == "apply_cached":
            if self.cos_dtype != "float32":
                parts.append(f"cache{_SHORT[self.cos_dtype]}")
            if self.positions_dtype != "int64":
                parts.append(f"pos{_SHORT[self.positions_dtype]}")
            if self.mrope is not None:
                kind, sec = self.mrope
                parts.append(f"{kind}{'_'.join(map(str, sec))}" + ("text" if self.mrope_rows == 1 else ""))
            if self.max_position != 64:
                parts.append(f"maxpos{self.max_position}")
        else:
            if self.cos_form != "half":
                parts.append("cosdup")
            if self.cos_dtype != "float32":
                parts.append(f"cos{_SHORT[self.cos_dtype]}")
            if self.cos_bcast != "token":
                parts.append(f"cos{self.cos_bcast}")
        if self.storage != "contiguous":
            parts.append(self.storage)
        if self.inplace:
            parts.append("inplace")
        if self.values != "normal":
            parts.append(self.values)
        if self.backward:
            parts.append("bwd")
        if self.device is not None:
            parts.append(self.device.replace(":", ""))
        return "-".join(parts)


def _unique(cases: list[RopeCase]) -> list[RopeCase]:
    seen: dict[str, RopeCase] = {}
    for c in cases:
        seen.setdefault(c.name, c)
    return list(seen.values())


# --------------------------------------------------------------------------------------------
# the fast tier

HEAD_DIMS = (2, 4, 6, 16, 64, 80, 96, 112, 128, 192, 256)
PARTIAL = ((4, 2), (6, 2), (64, 32), (80, 40), (96, 32), (128, 64), (128, 32), (192, 64), (256, 64), (16, 10))
XD = ("float32", "float16", "bfloat16")
LAYOUTS = ("neox", "interleaved")


def _cyc(seq, i):
    return seq[i % len(seq)]


def sample_cases() -> list[RopeCase]:
    """The fast tier: every feature of the contract (docs/contract.md), small tensors (CI, ``check``)."""
    C = RopeCase
    out: list[RopeCase] = []
    # head_dims x dtypes x layouts (full rotary), [T, H, D]
    for d, dt, lay in itertools.product(HEAD_DIMS, XD, LAYOUTS):
        out.append(C("apply", (5, 3, d), dt, lay))
    # partial rotary_dim
    for (d, r), dt, lay in itertools.product(PARTIAL, XD, LAYOUTS):
        out.append(C("apply", (4, 2, d), dt, lay, rotary_dim=r))
    # 1-D .. 5-D x with every cos broadcast that makes sense
    shapes = {
        "1d": ((16,), -2, ("scalar", "ones")),
        "hd": ((3, 16), -2, ("scalar", "head", "full", "ones", "expanded")),
        "thd": ((5, 3, 16), -2, ("token", "head", "full", "scalar", "ones", "expanded", "strided", "transposed")),
        "bshd": ((2, 5, 3, 16), -2, ("token", "batch", "head", "full", "scalar", "ones", "expanded", "strided", "transposed")),
        "bhsd": ((2, 3, 5, 16), -3, ("token", "batch", "head", "full", "scalar", "expanded", "strided", "transposed")),
        "5d": ((2, 2, 3, 2, 16), -2, ("token", "batch", "full")),
    }
    i = 0
    for shape, axis, bcasts in shapes.values():
        for b, lay in itertools.product(bcasts, LAYOUTS):
            out.append(C("apply", shape, _cyc(XD, i), lay, heads_axis=axis, cos_bcast=b, rotary_dim=_cyc((None, 12), i)))
            i += 1
    # cos/sin forms and dtypes
    for form, cdt, lay in itertools.product(("half", "dup"), ("float32", "float16", "bfloat16", "float64"), LAYOUTS):
        out.append(C("apply", (2, 6, 2, 32), _cyc(XD, i), lay, cos_form=form, cos_dtype=cdt))
        i += 1
    for form, lay, b in itertools.product(("dup",), LAYOUTS, ("batch", "scalar", "strided", "transposed")):
        out.append(C("apply", (2, 4, 3, 32), "bfloat16", lay, rotary_dim=24, cos_form=form, cos_bcast=b))
    # storages x ops x in-place
    for storage, op, inplace, lay in itertools.product(
        ("offset", "transposed", "permuted", "padded_rows", "strided_last", "fused_qkv"), OPS, (False, True), LAYOUTS
    ):
        shape = (2, 5, 4, 32) if op != "apply_cached" else (6, 4, 32)
        kh = 2 if op != "apply" else None
        out.append(C(op, shape, _cyc(XD, i), lay, k_heads=kh, storage=storage, inplace=inplace, rotary_dim=_cyc((None, 16), i // 2)))
        i += 1
    for op, lay in itertools.product(("apply", "apply_qk"), LAYOUTS):
        out.append(C(op, (3, 5, 2, 32), _cyc(XD, i), lay, storage="expanded"))
        out.append(C(op, (2, 3, 5, 32), _cyc(XD, i), lay, heads_axis=-3, storage="transposed", inplace=True))
        i += 1
    # apply_qk: GQA / MQA / equal heads, in place and out of place, bshd and bhsd
    for (hq, hk), dt, lay, inplace in itertools.product(((8, 2), (4, 1), (3, 3), (1, 4)), XD, LAYOUTS, (False, True)):
        out.append(C("apply_qk", (6, hq, 64), dt, lay, k_heads=hk, inplace=inplace))
    for (hq, hk), lay in itertools.product(((8, 2), (4, 1)), LAYOUTS):
        out.append(C("apply_qk", (2, 4, hq, 32), "bfloat16", lay, k_heads=hk, cos_bcast="batch"))
        out.append(C("apply_qk", (2, hq, 4, 32), "float16", lay, k_heads=hk, heads_axis=-3))
    # apply_cached: [T, H, D], vLLM [T, H*D] with head_dim=, [B, S, H, D]; k None; in/out of place
    for form, lay, inplace, knone in itertools.product(("thd", "flat", "bshd"), LAYOUTS, (True, False), (False, True)):
        if form == "thd":
            shape, hd = (7, 4, 64), None
        elif form == "flat":
            shape, hd = (7, 4 * 64), 64
        else:
            shape, hd = (2, 5, 4, 64), None
        out.append(C("apply_cached", shape, _cyc(XD, i), lay, head_dim=hd, k_heads=0 if knone else 2, inplace=inplace,
                     rotary_dim=_cyc((None, 32), i // 3)))
        i += 1
    # cache dtypes, positions dtypes, big max_position
    for cdt, pdt, lay in itertools.product(("float32", "float16", "bfloat16", "float64"), ("int64", "int32"), LAYOUTS):
        out.append(C("apply_cached", (5, 2, 32), _cyc(XD, i), lay, k_heads=1, cos_dtype=cdt, positions_dtype=pdt))
        i += 1
    out.append(C("apply_cached", (9, 4 * 128), "bfloat16", "neox", head_dim=128, k_heads=1, max_position=4096))
    # MRoPE: chunked (Qwen2-VL) / interleaved (Qwen3-VL) / ernie (Ernie4.5-VL); [3, T] and text-only
    mrope_dims = {
        "chunked": ((64, (8, 12, 12)), (32, (4, 6, 6)), (128, (16, 24, 24))),
        "interleaved": ((64, (12, 10, 10)), (32, (6, 5, 5)), (128, (24, 20, 20))),
        "ernie": ((64, (11, 11, 10)), (32, (6, 6, 4)), (128, (22, 22, 20))),
    }
    for kind, dims in mrope_dims.items():
        for (d, sec), lay, rows in itertools.product(dims[:2], LAYOUTS, (3, 1)):
            out.append(C("apply_cached", (6, 2, d), _cyc(XD, i), lay, k_heads=1, mrope=(kind, sec), mrope_rows=rows,
                         inplace=bool(i % 2)))
            i += 1
        d, sec = dims[2]
        out.append(C("apply_cached", (7, 2 * d), "bfloat16", "neox", head_dim=d, k_heads=1, mrope=(kind, sec)))
        out.append(C("apply_cached", (2, 3, 2, 64), "float16", "neox", k_heads=0, mrope=(kind, dims[0][1])))
        out.append(C("apply_cached", (5, 2, 80), "float32", "neox", k_heads=1, rotary_dim=64, mrope=(kind, dims[0][1])))
        out.append(C("apply_cached", (8, 6 * 32), "bfloat16", "neox", head_dim=32, k_heads=2, mrope=(kind, dims[1][1]),
                     storage="fused_qkv"))
    # empty tensors
    for op, lay in itertools.product(OPS, LAYOUTS):
        out.append(C(op, (0, 3, 32), "float16", lay, k_heads=1 if op != "apply" else None, inplace=lay == "neox"))
    out.append(C("apply", (2, 0, 3, 32), "bfloat16", "neox"))
    out.append(C("apply", (2, 4, 0, 32), "float32", "neox"))
    out.append(C("apply_cached", (0, 3 * 32), "float32", "neox", head_dim=32, k_heads=1))
    out.append(C("apply_cached", (0, 2, 32), "float32", "neox", k_heads=1, mrope=("chunked", (4, 6, 6))))
    # special values: in x, in cos/sin (or the cache)
    for dt, lay, op in itertools.product(XD, LAYOUTS, OPS):
        kh = 2 if op != "apply" else None
        out.append(C(op, (8, 3, 32), dt, lay, k_heads=kh, values="special"))
        out.append(C(op, (8, 3, 32), dt, lay, k_heads=kh, values="special_cos", inplace=op == "apply_cached"))
    for cdt in ("float16", "bfloat16", "float64"):
        out.append(C("apply", (6, 2, 16), "float32", "neox", cos_dtype=cdt, values="special_cos"))
        out.append(C("apply_cached", (6, 2, 16), "float32", "interleaved", cos_dtype=cdt, values="special_cos"))
    for dt in XD:
        out.append(C("apply", (8, 3, 40), dt, "neox", rotary_dim=24, values="special", storage="padded_rows", inplace=True))
    # backward: autograd grad == reference rotation by -theta of the upstream grad
    for op, dt, lay in itertools.product(OPS, XD, LAYOUTS):
        kh = 2 if op != "apply" else None
        out.append(C(op, (5, 4, 32), dt, lay, k_heads=kh, backward=True, rotary_dim=_cyc((None, 16), i)))
        i += 1
    out.append(C("apply", (2, 3, 5, 64), "bfloat16", "neox", heads_axis=-3, storage="transposed", backward=True))
    out.append(C("apply_qk", (2, 5, 4, 64), "float16", "interleaved", k_heads=2, storage="fused_qkv", backward=True))
    out.append(C("apply_qk", (2, 5, 4, 64), "float32", "neox", k_heads=1, cos_form="dup", cos_bcast="batch", backward=True))
    out.append(C("apply", (4, 2, 16), "float32", "neox", values="special", backward=True))
    # signed zeros in cos/sin through the backward (a conjugate lowered as 0.0 - sin fails these)
    for op, dt, lay in itertools.product(("apply", "apply_qk"), XD, LAYOUTS):
        out.append(C(op, (6, 3, 32), dt, lay, k_heads=2 if op == "apply_qk" else None, values="special_cos",
                     backward=True))
    out.append(C("apply", (3, 5, 2, 32), "bfloat16", "interleaved", storage="expanded", backward=True))
    out.append(C("apply_cached", (2, 4, 2, 64), "bfloat16", "neox", k_heads=1, mrope=("interleaved", (12, 10, 10)),
                 backward=True))
    out.append(C("apply_cached", (6, 2 * 32), "float16", "neox", head_dim=32, k_heads=0, backward=True))
    out += gpu_cases()
    return _unique(out)


def gpu_cases() -> list[RopeCase]:
    """Device-bound cases: more than 2**31 elements (q of ~2.2e9 bf16 elements, int64 offsets),
    and inputs on a second GPU (the kernel must launch on the tensors' own device)."""
    big = (2_100_000, 8, 128)  # 2.15e9 elements > 2**31
    return [
        RopeCase("apply", big, "bfloat16", "interleaved", device="cuda", marks=("gpu", "large")),
        RopeCase("apply_cached", big, "bfloat16", "neox", k_heads=0, inplace=True, max_position=4096,
                 device="cuda", marks=("gpu", "large")),
        RopeCase("apply_qk", (7, 8, 128), "bfloat16", "neox", k_heads=2, device="cuda:1", marks=("gpu", "multigpu")),
        RopeCase("apply_cached", (9, 4 * 64), "float16", "neox", head_dim=64, k_heads=1, inplace=True,
                 mrope=("interleaved", (12, 10, 10)), device="cuda:1", marks=("gpu", "multigpu")),
        RopeCase("apply", (4, 3, 32), "float32", "neox", backward=True, device="cuda:1", marks=("gpu", "multigpu")),
    ]


# --------------------------------------------------------------------------------------------
# the reduced tier for slow targets (Triton interpreter on CPU): small, still feature complete

def interp_cases() -> list[RopeCase]:
    """About 40 small cases covering every layout, dtype, op kind, MRoPE map, cos form and
    broadcast, storage, partial rotary_dim, GQA/MQA, empty and special values, and backward."""
    C = RopeCase
    out = []
    for dt, lay in itertools.product(XD, LAYOUTS):
        out.append(C("apply", (3, 2, 16), dt, lay))
        out.append(C("apply_qk", (3, 4, 32), dt, lay, k_heads=1, rotary_dim=16, inplace=True))
    out += [
        C("apply", (2, 3, 2, 80), "bfloat16", "neox", rotary_dim=40, cos_form="dup", cos_dtype="float64"),
        C("apply", (2, 2, 3, 16), "float16", "interleaved", heads_axis=-3, cos_bcast="batch", cos_dtype="bfloat16"),
        C("apply", (3, 2, 16), "float32", "interleaved", cos_form="dup", cos_bcast="strided"),
        C("apply", (2, 3, 2, 16), "float16", "neox", cos_bcast="expanded", storage="transposed"),
        C("apply", (3, 2, 16), "bfloat16", "neox", cos_bcast="transposed", storage="strided_last", inplace=True),
        C("apply", (3, 2, 2, 16), "float32", "neox", cos_bcast="scalar", storage="expanded"),
        C("apply", (4, 2, 24), "float16", "neox", rotary_dim=8, storage="padded_rows", inplace=True),
        C("apply", (2,), "float32", "interleaved", cos_bcast="scalar"),
        C("apply_qk", (2, 3, 4, 16), "bfloat16", "interleaved", k_heads=2, storage="fused_qkv", inplace=True),
        C("apply_qk", (2, 1, 3, 16), "float32", "neox", k_heads=2, heads_axis=-3, storage="permuted"),
        C("apply_cached", (4, 2, 16), "float32", "neox", k_heads=1, positions_dtype="int32", cos_dtype="bfloat16"),
        C("apply_cached", (4, 2 * 32), "bfloat16", "interleaved", head_dim=32, k_heads=1, rotary_dim=16,
          storage="fused_qkv", inplace=False),
        C("apply_cached", (2, 2, 2, 16), "float16", "neox", k_heads=0, storage="offset"),
        C("apply_cached", (4, 2, 32), "bfloat16", "neox", k_heads=1, mrope=("chunked", (4, 6, 6))),
        C("apply_cached", (4, 2, 32), "float16", "interleaved", k_heads=1, mrope=("interleaved", (6, 5, 5))),
        C("apply_cached", (4, 2, 32), "float32", "neox", k_heads=0, mrope=("ernie", (6, 6, 4))),
        C("apply_cached", (4, 2, 32), "bfloat16", "neox", k_heads=1, mrope=("interleaved", (6, 5, 5)), mrope_rows=1),
        C("apply", (0, 2, 16), "bfloat16", "neox", inplace=True),
        C("apply_cached", (0, 2, 16), "float16", "neox", k_heads=1),
    ]
    for dt in XD:
        out.append(C("apply", (4, 2, 16), dt, "neox", values="special"))
        out.append(C("apply_qk", (4, 2, 16), dt, "interleaved", k_heads=1, values="special_cos"))
    out.append(C("apply_cached", (4, 2, 16), "bfloat16", "neox", k_heads=1, values="special_cos", cos_dtype="float64"))
    out += [
        C("apply", (3, 2, 16), "bfloat16", "interleaved", backward=True),
        C("apply_qk", (3, 2, 32), "float16", "neox", k_heads=1, rotary_dim=16, backward=True),
        C("apply_cached", (3, 2, 16), "float32", "neox", k_heads=1, backward=True),
    ]
    return _unique(out)


# --------------------------------------------------------------------------------------------
# the exhaustive tier

def reference_cases() -> list[RopeCase]:
    """Cross products of every feature (GPU ``--full`` runs); a superset of ``sample_cases``."""
    C = RopeCase
    out = list(sample_cases())
    storages = ("contiguous", "offset", "transposed", "permuted", "padded_rows", "strided_last", "fused_qkv")
    for op, dt, lay, d, storage, inplace in itertools.product(
        ("apply", "apply_qk"), XD, LAYOUTS, (64, 80, 96, 112, 128, 192, 256), storages, (False, True)
    ):
        for r in (None, d // 2 if (d // 2) % 2 == 0 else d // 2 - 1):
            out.append(C(op, (2, 33, 4, d), dt, lay, rotary_dim=r, k_heads=1 if op == "apply_qk" else None,
                         storage=storage, inplace=inplace))
    for dt, lay, b, form, cdt in itertools.product(XD, LAYOUTS, ("token", "batch", "head", "full", "scalar", "ones",
                                                                  "expanded", "strided", "transposed"),
                                                   ("half", "dup"), ("float32", "float16", "bfloat16", "float64")):
        out.append(C("apply", (2, 17, 3, 64), dt, lay, cos_bcast=b, cos_form=form, cos_dtype=cdt))
        out.append(C("apply", (2, 3, 17, 64), dt, lay, heads_axis=-3, cos_bcast=b if b != "ones" else "token",
                     cos_form=form, cos_dtype=cdt))
    for dt, lay, d, form, storage, inplace, kh in itertools.product(
        XD, LAYOUTS, (64, 128, 256), ("thd", "flat", "bshd"), ("contiguous", "fused_qkv", "offset", "padded_rows"),
        (True, False), (0, 1, 8)
    ):
        shape = {"thd": (37, 8, d), "flat": (37, 8 * d), "bshd": (3, 13, 8, d)}[form]
        out.append(C("apply_cached", shape, dt, lay, head_dim=d if form == "flat" else None, k_heads=kh,
                     storage=storage, inplace=inplace, max_position=8192))
    sections = {"chunked": (16, 24, 24), "interleaved": (24, 20, 20), "ernie": (22, 22, 20)}
    for (kind, sec), dt, lay, rows, inplace, kh in itertools.product(sections.items(), XD, LAYOUTS, (3, 1),
                                                                      (True, False), (0, 2)):
        out.append(C("apply_cached", (29, 4 * 128), dt, lay, head_dim=128, k_heads=kh, mrope=(kind, sec),
                     mrope_rows=rows, inplace=inplace, max_position=8192))
    for op, dt, lay, values, storage in itertools.product(OPS, XD, LAYOUTS, ("special", "special_cos"),
                                                          ("contiguous", "strided_last")):
        out.append(C(op, (16, 4, 64), dt, lay, k_heads=2 if op != "apply" else None, values=values, storage=storage))
    for op, dt, lay, d, storage in itertools.product(OPS, XD, LAYOUTS, (64, 128, 256), ("contiguous", "transposed")):
        out.append(C(op, (3, 11, 4, d), dt, lay, k_heads=1 if op != "apply" else None, backward=True,
                     storage=storage, rotary_dim=d // 2))
    return _unique(out)


# which targets use the reduced tier: (backend, device type) -> tier function. Empty today: the
# Triton interpreter runs the whole sample tier in ~20 s on 2 cores (512/512 bit-exact, measured
# 2026-11-23), so CI checks the kernels on every sample case. A slow plug-in target adds itself here,
# e.g. {("triton", "cpu"): interp_cases}.
REDUCED_TIERS: Mapping[tuple[str, str], Callable[[], list[RopeCase]]] = {}


def cases_for(backend: str, device_type: str, full: bool = False) -> list[RopeCase]:
    """The cases a target runs: ``reference_cases()`` with ``full``, else the reduced tier where
    ``REDUCED_TIERS`` names one (the Triton interpreter), else ``sample_cases()``."""
    if full:
        return reference_cases()
    tier = REDUCED_TIERS.get((backend, device_type))
    return tier() if tier is not None else sample_cases()


# --------------------------------------------------------------------------------------------
# the bad-input catalogue (docs/contract.md, "Errors"; rendered as docs/errors.md)

@dataclass
class ErrorCall:
    """A bad call ready to make. ``fn(backend)`` makes it (``backend`` is the target's name,
    passed as ``backend=`` unless the case is about the backend argument itself). ``watched``
    tensors must be bit-identical after the failure. ``env`` is set and ``context`` entered
    around the call."""

    fn: Callable[[str | None], object]
    watched: tuple[torch.Tensor, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


@dataclass(frozen=True)
class ErrorCase:
    """One bad input: ``build(device) -> ErrorCall``; the call must raise ``error`` with a
    message that starts with ``arg + ":"`` and says what was expected and what came."""

    name: str
    error: type
    arg: str
    build: Callable[[str], ErrorCall] = field(compare=False, repr=False)
    device_types: tuple[str, ...] | None = None  # None: any device
    why: str = ""  # the rule, in one sentence: why the library refuses this (docs/errors.md's table)


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(shape, dtype=torch.float64).to(dtype).to(device)


def _cs(shape, device="cpu", dtype=torch.float32):
    return _t(*shape, dtype=dtype, device=device), _t(*shape, dtype=dtype, device=device)


def _pos(n, device, hi=16, dtype=torch.int64):
    return (torch.arange(n) % hi).to(dtype).to(device)


@contextlib.contextmanager
def _temporary_backend(**fields) -> Iterator[None]:
    from .. import reference
    from ..registry import Backend, register_backend, unregister_backend

    register_backend(Backend(forward=reference.run, **fields))
    try:
        yield
    finally:
        unregister_backend(fields["name"])


# The rules behind the refusals, one sentence each: docs/errors.md groups the cases by them.
WHY = {
    "rotary_dim": "rotary_dim is an even int in [2, head_dim] (apply_cached: the cache's width): a pair needs "
                  "two elements and the rotated part must fit in head_dim",
    "dtype": "q/k/x are float32, float16 or bfloat16 and share one dtype; cos/sin and the cache are floating: "
             "the kernels compute in float32 and round once to the input dtype",
    "device": "every tensor of a call is on one device: one kernel launch reads them all",
    "tables": "cos/sin hold one value per pair (last dim rotary_dim//2) or the duplicated form (rotary_dim), "
              "have one shape and broadcast to x.shape[:-1]: anything else has no single reading",
    "partial": "cos/sin of width head_dim/2 with equal halves (neox) or even/odd columns (interleaved) that "
               "rotate something are the duplicated form of a partial rotation, which without rotary_dim= "
               "would silently be read as the half form of a full one",
    "grad": "derivatives flow to the rotated tensors only: cos/sin or a cache that requires grad, or that "
            "carries a forward-mode tangent, would silently get none",
    "shapes": "rotated tensors are [..., heads, head_dim] (apply_cached: also [T, heads*head_dim] with "
              "head_dim=), q and k with one head_dim (and, for apply_cached, the same leading dims)",
    "positions": "positions are integer row indices into the cache, shaped like q's token dims ([3, T] only "
                 "with mrope=); out-of-range values are refused where the check costs no sync (CPU, or "
                 "ROPE_BACKENDS_DEBUG=1)",
    "mrope": "an MRoPE axis map names a position row (0, 1 or 2) for each of the rotary_dim//2 pairs",
    "options": "layout is 'neox' or 'interleaved' (or a rope_backends.Layout); inplace is a bool",
    "inplace_grad": "an in-place call is not differentiable: a target that requires grad (with grad enabled) "
                    "would silently lose its gradient",
    "memory": "a kernel's programs run at once: an in-place target whose elements share memory, q and k "
              "sharing memory, or a target sharing memory with cos/sin/positions/cache would make the "
              "result depend on which program runs first (q and k are kept apart out of place too)",
    "negative": "a lazily negated view (torch's negative bit) holds its values negated in memory: a "
                "kernel's write into it would land un-negated",
    "layout": "kernels follow strides: sparse and nested tensors have none",
    "backend": "an explicit backend that cannot run the call raises with every candidate and its "
               "reason: never a silent fallback",
    "override": "an override string that cannot mean what was written (empty, a device type no backend "
                "declares, a device type twice) is refused instead of silently falling back to "
                "automatic selection",
}


def error_cases() -> list[ErrorCase]:
    """Every bad input of docs/contract.md ("Errors") and more, each raising its documented type naming the
    argument, each with the rule it breaks (``why``, from :data:`WHY`)."""
    import torch.autograd.forward_ad as fwAD

    import rope_backends as rb

    E, Call = ErrorCase, ErrorCall
    cases: list[ErrorCase] = []
    rule = [""]

    def because(key):
        rule[0] = WHY[key]

    def add(name, error, arg, build, device_types=None):
        cases.append(E(name, error, arg, build, device_types, rule[0]))

    def apply_case(name, error, arg, *, x=None, cos=None, sin=None, inplace=False, watch_x=True, device_types=None,
                   env=None, context=contextlib.nullcontext, wrap=None, **kw):
        def build(device):
            xx = x(device) if x else _t(4, 2, 16, device=device)
            c, s = (cos(device), sin(device)) if cos else _cs((4, 1, 8), device)
            watched = (xx, c, s) if watch_x else (c, s)
            wrapped = wrap or (lambda t: t)
            return Call(lambda b: rb.apply(xx, wrapped(c), s, inplace=inplace, backend=b, **kw),
                        watched=tuple(t for t in watched if isinstance(t, torch.Tensor)), env=env or {},
                        context=context)
        add(name, error, arg, build, device_types)

    def qk_case(name, error, arg, *, q=None, k=None, cos=None, sin=None, inplace=True, watch=None, **kw):
        def build(device):
            qq = q(device) if q else _t(4, 4, 16, device=device)
            kk = k(device, qq) if k else _t(4, 2, 16, device=device)
            c, s = (cos(device), sin(device)) if cos else _cs((4, 1, 8), device)
            watched = (qq, kk, c, s) + (tuple(watch(qq, kk)) if watch is not None else ())
            return Call(lambda b: rb.apply_qk(qq, kk, c, s, inplace=inplace, backend=b, **kw), watched=watched)
        add(name, error, arg, build)

    def cached_case(name, error, arg, *, q=None, k=None, positions=None, cache=None, device_types=None, env=None,
                    inplace=True, context=contextlib.nullcontext, wrap=None, qk=None, **kw):
        def build(device):
            if qk is not None:  # q and k (and what to watch) made together: views of one buffer
                qq, kk, extra = qk(device)
            else:
                qq = q(device) if q else _t(6, 4, 16, device=device)
                kk = k(device) if k else _t(6, 2, 16, device=device)
                extra = ()
            pp = positions(device) if positions else _pos(6, device)
            cc = cache(device, qq) if cache else rb.cos_sin_cache(16, 16, device=device)
            wrapped = wrap or (lambda t: t)
            watched = tuple(t for t in (qq, kk, pp, cc, *extra) if isinstance(t, torch.Tensor))
            return Call(lambda b: rb.apply_cached(qq, kk, pp, wrapped(cc), inplace=inplace, backend=b, **kw),
                        watched=watched, env=env or {}, context=context)
        add(name, error, arg, build, device_types)

    because("rotary_dim")
    apply_case("rotary_dim_odd", ValueError, "rotary_dim", rotary_dim=7, inplace=True)
    apply_case("rotary_dim_oversized", ValueError, "rotary_dim", rotary_dim=18, inplace=True)
    apply_case("rotary_dim_zero", ValueError, "rotary_dim", rotary_dim=0)
    apply_case("rotary_dim_negative", ValueError, "rotary_dim", rotary_dim=-2)
    apply_case("rotary_dim_float", TypeError, "rotary_dim", rotary_dim=8.0, inplace=True)
    apply_case("rotary_dim_str", TypeError, "rotary_dim", rotary_dim="8")
    apply_case("rotary_dim_bool", TypeError, "rotary_dim", rotary_dim=True)
    cached_case("rotary_dim_not_cache_width", ValueError, "rotary_dim", rotary_dim=8)
    cached_case("cache_width_odd", ValueError, "cos_sin_cache.shape[1] (rotary_dim)",
                cache=lambda dev, q: _t(16, 15, device=dev))
    cached_case("cache_wider_than_head_dim", ValueError, "cos_sin_cache.shape[1] (rotary_dim)",
                cache=lambda dev, q: _t(16, 18, device=dev))
    because("dtype")
    qk_case("k_dtype_mismatch", TypeError, "k", k=lambda dev, q: _t(4, 2, 16, dtype=torch.float16, device=dev))
    apply_case("sin_dtype_mismatch", TypeError, "sin", cos=lambda dev: _t(4, 1, 8, device=dev),
               sin=lambda dev: _t(4, 1, 8, dtype=torch.float16, device=dev), inplace=True)
    apply_case("x_float64", TypeError, "x", x=lambda dev: _t(4, 2, 16, dtype=torch.float64, device=dev), inplace=True)
    apply_case("x_int", TypeError, "x", x=lambda dev: torch.ones(4, 2, 16, dtype=torch.int32, device=dev), inplace=True)
    cached_case("q_int", TypeError, "q", q=lambda dev: torch.ones(6, 4, 16, dtype=torch.int64, device=dev))
    cached_case("k_dtype_mismatch_cached", TypeError, "k", k=lambda dev: _t(6, 2, 16, dtype=torch.bfloat16, device=dev))
    apply_case("cos_int", TypeError, "cos", cos=lambda dev: torch.ones(4, 1, 8, dtype=torch.int32, device=dev),
               sin=lambda dev: torch.ones(4, 1, 8, dtype=torch.int32, device=dev))
    cached_case("cache_int", TypeError, "cos_sin_cache",
                cache=lambda dev, q: torch.ones(16, 16, dtype=torch.int32, device=dev))
    because("device")  # (simulated with the meta device)
    qk_case("k_other_device", ValueError, "k", k=lambda dev, q: _t(4, 2, 16, device="meta"))
    apply_case("cos_other_device", ValueError, "cos", cos=lambda dev: _t(4, 1, 8, device="meta"),
               sin=lambda dev: _t(4, 1, 8, device="meta"), inplace=True)
    apply_case("sin_other_device", ValueError, "sin", cos=lambda dev: _t(4, 1, 8, device=dev),
               sin=lambda dev: _t(4, 1, 8, device="meta"), inplace=True)
    cached_case("positions_other_device", ValueError, "positions", positions=lambda dev: _pos(6, "meta"))
    cached_case("cache_other_device", ValueError, "cos_sin_cache",
                cache=lambda dev, q: torch.empty(16, 16, device="meta"))
    cached_case("k_other_device_cached", ValueError, "k", k=lambda dev: _t(6, 2, 16, device="meta"))
    because("tables")
    apply_case("cos_not_broadcastable", ValueError, "cos", cos=lambda dev: _t(5, 1, 8, device=dev),
               sin=lambda dev: _t(5, 1, 8, device=dev), inplace=True)
    apply_case("cos_too_many_dims", ValueError, "cos", cos=lambda dev: _t(2, 4, 1, 8, device=dev),
               sin=lambda dev: _t(2, 4, 1, 8, device=dev))
    apply_case("sin_shape_differs", ValueError, "sin", cos=lambda dev: _t(4, 1, 8, device=dev),
               sin=lambda dev: _t(4, 2, 8, device=dev), inplace=True)
    apply_case("cos_wrong_last_dim", ValueError, "cos", cos=lambda dev: _t(4, 1, 12, device=dev),
               sin=lambda dev: _t(4, 1, 12, device=dev), inplace=True)
    apply_case("cos_wrong_last_dim_partial", ValueError, "cos", rotary_dim=12)
    apply_case("cos_0d", ValueError, "cos", cos=lambda dev: torch.tensor(1.0, device=dev),
               sin=lambda dev: torch.tensor(0.0, device=dev))
    qk_case("cos_not_broadcastable_to_k", ValueError, "cos", cos=lambda dev: _t(4, 4, 8, device=dev),
            sin=lambda dev: _t(4, 4, 8, device=dev))
    apply_case("cos_not_tensor", TypeError, "cos", cos=lambda dev: [[0.5] * 8] * 4, sin=lambda dev: _t(4, 1, 8, device=dev),
               inplace=True)
    because("partial")
    # GLM-style: rotary_dim = head_dim/2 = 8, the duplicated form of its 4 frequencies, no rotary_dim=
    for layout in ("neox", "interleaved"):
        for debug in (False, True):
            apply_case(f"cos_partial_rotary_without_rotary_dim_{layout}" + ("_debug" if debug else ""), ValueError,
                       "cos", cos=lambda dev, layout=layout: _dup_table(dev, layout)[0],
                       sin=lambda dev, layout=layout: _dup_table(dev, layout)[1], layout=layout, inplace=True,
                       env={"ROPE_BACKENDS_DEBUG": "1"} if debug else None,
                       device_types=None if debug else ("cpu",))
    because("grad")
    apply_case("cos_requires_grad", ValueError, "cos", cos=lambda dev: _t(4, 1, 8, device=dev).requires_grad_(),
               sin=lambda dev: _t(4, 1, 8, device=dev))
    apply_case("cos_forward_tangent", ValueError, "cos", context=fwAD.dual_level,
               wrap=lambda c: fwAD.make_dual(c, torch.ones_like(c)))
    cached_case("cache_requires_grad", ValueError, "cos_sin_cache",
                cache=lambda dev, q: rb.cos_sin_cache(16, 16, device=dev).requires_grad_())
    cached_case("cache_requires_grad_training", ValueError, "cos_sin_cache", inplace=False,
                q=lambda dev: _t(6, 4, 16, device=dev).requires_grad_(),
                cache=lambda dev, q: torch.nn.Parameter(rb.cos_sin_cache(16, 16, device=dev)))
    cached_case("cache_forward_tangent", ValueError, "cos_sin_cache", inplace=False, context=fwAD.dual_level,
                wrap=lambda c: fwAD.make_dual(c, torch.ones_like(c)))
    because("shapes")
    apply_case("x_not_tensor", TypeError, "x", x=lambda dev: [[1.0] * 16] * 4, watch_x=False)
    apply_case("x_0d", ValueError, "x", x=lambda dev: torch.tensor(1.0, device=dev))
    qk_case("k_head_dim_mismatch", ValueError, "k", k=lambda dev, q: _t(4, 2, 18, device=dev))
    cached_case("k_lead_mismatch", ValueError, "k", k=lambda dev: _t(5, 2, 16, device=dev))
    cached_case("q_2d_without_head_dim", ValueError, "head_dim", q=lambda dev: _t(6, 64, device=dev),
                k=lambda dev: _t(6, 32, device=dev))
    cached_case("head_dim_not_dividing", ValueError, "q", q=lambda dev: _t(6, 60, device=dev),
                k=lambda dev: _t(6, 32, device=dev), head_dim=16)
    cached_case("head_dim_bad_value", ValueError, "head_dim", q=lambda dev: _t(6, 64, device=dev),
                k=lambda dev: _t(6, 32, device=dev), head_dim=0)
    cached_case("head_dim_contradicts_q", ValueError, "head_dim", head_dim=32)
    cached_case("q_1d", ValueError, "q", q=lambda dev: _t(64, device=dev), k=lambda dev: _t(32, device=dev))
    cached_case("cache_1d", ValueError, "cos_sin_cache", cache=lambda dev, q: _t(16, device=dev))
    because("positions")
    cached_case("positions_float", TypeError, "positions", positions=lambda dev: torch.zeros(6, device=dev))
    cached_case("positions_bool", TypeError, "positions", positions=lambda dev: torch.zeros(6, dtype=torch.bool, device=dev))
    cached_case("positions_out_of_range", ValueError, "positions",
                positions=lambda dev: torch.tensor([0, 1, 2, 3, 4, 16], device=dev), device_types=("cpu",))
    cached_case("positions_negative", ValueError, "positions",
                positions=lambda dev: torch.tensor([0, 1, -1, 3, 4, 5], device=dev), device_types=("cpu",))
    cached_case("positions_out_of_range_debug", ValueError, "positions",
                positions=lambda dev: torch.tensor([0, 1, 2, 3, 4, 99], device=dev), env={"ROPE_BACKENDS_DEBUG": "1"})
    cached_case("positions_wrong_shape", ValueError, "positions", positions=lambda dev: _pos(5, dev))
    cached_case("positions_2d_wrong", ValueError, "positions", positions=lambda dev: _pos(12, dev).view(2, 6))
    cached_case("positions_3_rows_without_mrope", ValueError, "positions",
                positions=lambda dev: _pos(18, dev).view(3, 6))
    cached_case("positions_4_rows_with_mrope", ValueError, "positions", positions=lambda dev: _pos(24, dev).view(4, 6),
                mrope=rb.mrope.chunked((2, 3, 3)))
    because("mrope")
    cached_case("mrope_length_mismatch", ValueError, "mrope", positions=lambda dev: _pos(18, dev).view(3, 6),
                mrope=rb.mrope.chunked((2, 2, 2)))
    cached_case("mrope_bad_axis", ValueError, "mrope", mrope=(0, 1, 2, 3, 0, 1, 2, 0))
    cached_case("mrope_not_sequence", TypeError, "mrope", mrope=3)
    because("options")
    apply_case("layout_unknown", ValueError, "layout", layout="gptj", inplace=True)
    apply_case("layout_not_str", ValueError, "layout", layout=1)
    apply_case("inplace_not_bool", TypeError, "inplace", inplace=1)
    because("inplace_grad")
    apply_case("inplace_requires_grad", ValueError, "x", x=lambda dev: _t(4, 2, 16, device=dev).requires_grad_(),
               inplace=True)
    because("memory")
    apply_case("inplace_expanded_view", ValueError, "x", x=lambda dev: _t(1, 2, 16, device=dev).expand(4, 2, 16),
               inplace=True)
    cached_case("inplace_expanded_k", ValueError, "k", k=lambda dev: _t(6, 1, 16, device=dev).expand(6, 2, 16))
    # a target whose rows step by half a row: each element but the first 8 of a row is another row's
    apply_case("inplace_self_overlap", ValueError, "x", inplace=True,
               x=lambda dev: _t(64, device=dev).as_strided((4, 1, 16), (8, 8, 1)))
    cached_case("inplace_self_overlap_k", ValueError, "k",
                k=lambda dev: _t(96, device=dev).as_strided((6, 2, 16), (8, 16, 1)))
    qk_case("q_is_k", ValueError, "k", k=lambda dev, q: q)
    qk_case("k_view_of_q", ValueError, "k", q=lambda dev: _t(4, 4, 16, device=dev), k=lambda dev, q: q[:, :2])
    add("k_is_q_cached", ValueError, "k", _same_qk_cached)
    # k is q shifted by one head: [T, 6, D] buffer, q = heads 0..3, k = heads 1..4
    qk_case("k_overlaps_q", ValueError, "k", q=lambda dev: _buffer(dev, (4, 6, 16))[:, 0:4],
            k=lambda dev, q: q._base[:, 1:3], watch=lambda q, k: (q._base,))
    qk_case("k_overlaps_q_out_of_place", ValueError, "k", inplace=False, q=lambda dev: _buffer(dev, (4, 6, 16))[:, 0:4],
            k=lambda dev, q: q._base[:, 3:5], watch=lambda q, k: (q._base,))
    # the slicing slip of a fused qkv: q = qkv[:, :64], k = qkv[:, 48:80] (head_dim 16)
    cached_case("k_overlaps_q_fused_qkv", ValueError, "k", head_dim=16, qk=_fused_slip)
    add("inplace_x_overlaps_cos", ValueError, "x", _x_overlaps_cos)
    cached_case("inplace_q_overlaps_cache", ValueError, "q", k=lambda dev: _t(6, 2, 16, device=dev),
                q=lambda dev: _buffer(dev, (6, 4, 16)), cache=lambda dev, q: q.view(-1)[:256].view(16, 16))
    because("negative")
    apply_case("inplace_negative_view", ValueError, "x", x=lambda dev: torch._neg_view(_t(4, 2, 16, device=dev)),
               inplace=True)
    qk_case("inplace_negative_view_k", ValueError, "k", k=lambda dev, q: torch._neg_view(_t(4, 2, 16, device=dev)))
    cached_case("inplace_negative_view_q", ValueError, "q", q=lambda dev: torch._neg_view(_t(6, 4, 16, device=dev)))
    because("layout")
    apply_case("x_sparse", TypeError, "x", x=lambda dev: _t(4, 2, 16, device=dev).to_sparse())
    apply_case("cos_sparse", TypeError, "cos", cos=lambda dev: _t(4, 1, 8, device=dev).to_sparse(),
               sin=lambda dev: _t(4, 1, 8, device=dev))
    cached_case("positions_sparse", TypeError, "positions", positions=lambda dev: _pos(6, dev).to_sparse())
    qk_case("k_nested", TypeError, "k", k=lambda dev, q: torch.nested.nested_tensor(
        [_t(2, 16, device=dev), _t(1, 16, device=dev)]), inplace=False)

    # backends and overrides (the backend argument is the bad input here)
    def backend_case(name, arg, fn_of, env=None, context=contextlib.nullcontext, error=ValueError):
        def build(device):
            x = _t(4, 2, 16, device=device)
            c, s = _cs((4, 1, 8), device)
            return Call(fn_of(x, c, s), watched=(x, c, s), env=env or {}, context=context)
        add(name, error, arg, build)

    def env_case(name, value):
        backend_case(name, "ROPE_BACKEND", lambda x, c, s: (lambda b: rb.apply(x, c, s, inplace=True)),
                     env={"ROPE_BACKEND": value})

    def context_case(name, value):
        backend_case(name, "use_backend",
                     lambda x, c, s: (lambda b: _in_context(value, lambda: rb.apply(x, c, s, inplace=True))))

    def argument_case(name, value):
        backend_case(name, "backend", lambda x, c, s: (lambda b: rb.apply(x, c, s, inplace=True, backend=value)))

    because("backend")
    argument_case("backend_unknown", "no_such_backend")
    backend_case("backend_not_str", "backend", lambda x, c, s: (lambda b: rb.apply(x, c, s, backend=3)), error=TypeError)
    backend_case("backend_wrong_device", "backend",
                 lambda x, c, s: (lambda b: rb.apply(x, c, s, inplace=True, backend="rb_testing_nowhere")),
                 context=lambda: _temporary_backend(name="rb_testing_nowhere", device_types=("rb_nowhere",), priority=0))
    backend_case("backend_unavailable", "backend",
                 lambda x, c, s: (lambda b: rb.apply(x, c, s, inplace=True, backend="rb_testing_absent")),
                 context=lambda: _temporary_backend(name="rb_testing_absent", device_types=("*",), priority=0,
                                                    probe=lambda: "rb_testing_absent is never available"))
    context_case("use_backend_unknown", "no_such_backend")
    env_case("env_unknown_backend", "no_such_backend")
    because("override")
    argument_case("backend_empty", "")
    argument_case("backend_unknown_device_type", "gpu:triton")
    context_case("use_backend_bad_spec", "cuda:")
    context_case("use_backend_empty", "")
    context_case("use_backend_unknown_device_type", "gpu:triton")
    context_case("use_backend_device_type_case", "CPU:npu")
    context_case("use_backend_device_twice", "cpu:eager,cpu:npu")
    env_case("env_bad_string", " , ,")
    env_case("env_bad_pair", "cpu:")
    env_case("env_unknown_device_type", "gpu:triton")
    env_case("env_device_type_case", "CPU:npu")
    env_case("env_device_twice", "cpu:eager,cpu:npu")
    env_case("env_two_names", "eager,npu")
    names = [c.name for c in cases]
    if len(names) != len(set(names)):
        raise ValueError(f"error_cases: duplicate names {sorted(n for n in names if names.count(n) > 1)}")
    if any(not c.why for c in cases):
        raise ValueError(f"error_cases: no rule (why) for {[c.name for c in cases if not c.why]}")
    return cases


def _buffer(device, shape):
    return _t(*shape, device=device)


def _dup_table(device, layout):
    """cos/sin [4, 1, 8]: the duplicated form of 4 frequencies (rotary_dim 8 of head_dim 16), with
    positions 1..4 so that sin != 0."""
    import rope_backends as rb

    cos, sin = rb.cos_sin(torch.arange(1, 5), 8)
    if layout == "neox":
        cos, sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    else:
        cos, sin = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
    return cos[:, None].to(device), sin[:, None].to(device)


def _fused_slip(device):
    qkv = _t(6, 96, device=device)
    return qkv[:, :64], qkv[:, 48:80], (qkv,)


def _x_overlaps_cos(device: str) -> ErrorCall:
    """x [4, 2, 16] in place; cos a [4, 1, 8] view into x's own memory (same shape and strides as
    a table of its own)."""
    import rope_backends as rb

    x = _t(4, 2, 16, device=device)
    cos = x.view(-1)[32:64].view(4, 1, 8)
    sin = _t(4, 1, 8, device=device)
    return ErrorCall(lambda b: rb.apply(x, cos, sin, inplace=True, backend=b), watched=(x, sin))


def _in_context(spec, fn):
    import rope_backends as rb

    with rb.use_backend(spec):
        return fn()


def _same_qk_cached(device: str) -> ErrorCall:
    import rope_backends as rb

    q = _t(6, 4, 16, device=device)
    pos, cache = _pos(6, device), rb.cos_sin_cache(16, 16, device=device)
    return ErrorCall(lambda b: rb.apply_cached(q, q, pos, cache, backend=b), watched=(q, pos, cache))
