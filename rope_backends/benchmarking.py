"""The benchmark engine: named scenario groups, peers, copy bandwidth, timing, table/JSON/PNG writers.

Used by ``python -m bench`` (bench/run.py, the full suite) and by ``python -m rope_backends check
--bench`` (:func:`run_short`). It lives in the package so the short bench works from an installed
wheel; the full suite's extras (``bench/rope_index.py``, the results folder) come from a checkout.

What one run does, per device:
  1. measures the device's copy bandwidth (a large device-to-device copy on a GPU, a large memcpy
     on the CPU), counting bytes read + bytes written;
  2. for every case of the chosen groups and every implementation -- each available
     rope_backends backend serving the device automatically, plus the peers (eager strided = the
     reference, eager stack+flatten, ``torch.compile`` of the HF-style formula, Liger-Kernel and
     FlashInfer when installed) -- checks the output once, bit for bit, against the reference on
     that case, then times it: GPU with ``triton.testing.do_bench`` (median; several input buffers
     rotated when the working set fits in L2) and, for decode sizes, CUDA-graph replay
     (``do_bench_cudagraph``); CPU with ``torch.utils.benchmark.Timer.blocked_autorange`` (median);
  3. reports µs, GB/s (see :data:`BYTE_RULE`), % of the copy bandwidth and ``bit_exact``.

Groups: ``diffusion`` (single-tensor apply, interleaved), ``llm`` (apply_qk / apply_cached, GQA,
decode under CUDA graphs next to an empty Triton launch), ``mrope`` (three MRoPE axis maps vs
plain), ``backward`` (autograd backward vs forward), ``rope_index`` (bench/rope_index.py when the
checkout has it), ``dispatch`` (host overhead of ``rb.apply`` over the backend's forward and over a
direct kernel launch).

This module contains no kernel and changes no backend; matplotlib, Liger-Kernel and FlashInfer
are optional (absent: no plot, rows omitted with a note). It never benchmarks the Triton
interpreter or any backend that serves a device only when named (test vehicles).
"""

from __future__ import annotations

import datetime as _dt
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform as _pyplatform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import __version__, platform, reference
from .dispatch import apply, apply_cached, apply_qk
from .freqs import cos_sin, cos_sin_cache
from .mrope import chunked, ernie, interleaved
from .registry import backends as _backend_infos
from .registry import get as _get_backend
from .spec import Layout, MRope, args_for_cached, args_for_tables
from .testing.check import bitwise_mismatches

__all__ = [
    "GROUPS",
    "SCHEMA",
    "BYTE_RULE",
    "run",
    "run_short",
    "format_tables",
    "markdown_report",
    "write_json",
    "write_plot",
    "summarize",
    "default_out_dir",
]

SCHEMA = "rope_backends.bench/1"
GROUPS = ("diffusion", "qk", "llm", "mrope", "backward", "rope_index", "dispatch")
BYTE_RULE = (
    "bytes = what the op must move, each element once: the rotated tensors read plus their outputs "
    "written (in place: read and written back), cos and sin read once at the size given to the call "
    "(apply, apply_qk, backward: the gradient instead of x), or for apply_cached the positions read "
    "once plus tokens x rotary_dim cache values (each token's cos and sin). Not counted: temporaries, "
    "broadcast re-reads, and inputs a peer needs beyond the call (duplicated cos/sin, a 1-head dummy k). "
    "GB/s = bytes / median time; % copy = GB/s / the copy bandwidth measured first (its bytes counted "
    "the same way: read + written)."
)

_ROOT = Path(__file__).resolve().parents[1]
_MAX_POS = 32768                    # cache rows for the llm/mrope groups (16 MiB of fp32 at D=128)
_ROT_CAP = {"cuda": 64, "cpu": 8}   # at most this many rotated input buffers


class Skip(Exception):
    """An implementation that cannot run this case here (not installed, no such layout...)."""


# ------------------------------------------------------------------------------------------------
# cases


@dataclass
class Case:
    """One benchmarked call. ``make(seed)`` builds one input set on the device (a dict);
    ``reference(inputs, layout)`` computes the expected outputs from fresh inputs."""

    group: str
    scenario: str
    op: str                     # apply | apply_qk | apply_cached | forward | backward | launch
    shape: str
    dtype: torch.dtype
    layout: str
    tokens: int
    nbytes: int
    make: Callable[[int], dict]
    reference: Callable[[dict, str], tuple[Tensor, ...]] | None
    graph: bool = False         # also time under CUDA-graph replay (decode sizes on a GPU)
    mrope: MRope | None = None
    host: bool = False          # dispatch group: host time of back-to-back calls
    inplace: bool = False       # the rope calls write into their inputs (qk group)


@dataclass
class Impl:
    """One implementation of a case. ``prepare(inputs)`` returns a zero-argument callable that
    runs the op on that input set and returns its outputs (a tuple of tensors)."""

    name: str
    kind: str                   # backend | peer | baseline
    prepare: Callable[[dict], Callable[[], tuple]]
    mutates: bool = False       # writes into its inputs (in place): checked on a clone
    layout: str | None = None   # computes another layout than the case's (Liger: neox only)
    note: str = ""
    checked: bool = True        # compared with the reference (False: a baseline that computes no rope)


def _shape(*shapes: Sequence[int], names: Sequence[str] = ()) -> str:
    parts = []
    for i, s in enumerate(shapes):
        text = "(" + ",".join(str(int(v)) for v in s) + ")"
        parts.append(f"{names[i]}{text}" if i < len(names) else text)
    return " ".join(parts)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


# --- shapes per scale: "gpu" (the shapes), "cpu" (small), "tiny" (tests), "short" -------

DIFFUSION_SHAPES = {
    "gpu": [(1, 115200, 24, 128), (1, 32760, 12, 128), (2, 4096, 24, 128), (1, 4096, 32, 64), (4096, 24, 128)],
    "cpu": [(1, 4096, 12, 128), (1, 2048, 12, 128), (2, 512, 24, 128), (1, 512, 32, 64), (512, 24, 128)],
    "tiny": [(1, 16, 2, 32), (16, 2, 32)],
    "short-gpu": [(1, 32760, 12, 128)],
    "short-cpu": [(1, 1024, 12, 128)],
}
DIFFUSION_NAMES = ["video-115k", "video-33k", "batch2-4k", "d64-4k", "3d-[S,H,D]"]  # by position
# q + k in place (training-style apply_qk, neox): (q shape, k heads) per scale
QK_SHAPES = {
    "gpu": [((1, 115200, 24, 128), 8), ((1, 32760, 12, 128), 4), ((2, 4096, 24, 128), 8)],
    "cpu": [((1, 1024, 12, 128), 4), ((2, 256, 24, 128), 8)],
    "tiny": [((1, 16, 2, 32), 1)],
}
LLM_TOKENS = {
    "gpu": [1, 16, 64, 256, 4096, 16384],
    "cpu": [1, 16, 64, 256, 1024],
    "tiny": [1, 8],
    "short-gpu": [1, 4096],
    "short-cpu": [1, 256],
}
LLM_HEADS = {"tiny": (4, 2)}            # (q heads, k heads); default (32, 8)
MROPE_TOKENS = {"gpu": 4096, "cpu": 256, "tiny": 8}
BACKWARD_SHAPES = {
    "gpu": [((1, 32760, 12, 128), "interleaved"), ((2, 4096, 32, 128), "neox")],
    "cpu": [((1, 1024, 12, 128), "interleaved"), ((2, 256, 32, 128), "neox")],
    "tiny": [((1, 16, 2, 32), "interleaved")],
}
DECODE_GRAPH_MAX_T = 64
# the GPU targets (docs/benchmarks.md): the largest diffusion shape at >= 98 % of the 1 GiB copy's
# bandwidth in both layouts; the smaller ones within 3 % of a copy of as many bytes; apply_cached
# at T >= 4096 within 3 % of such a copy; host time of a call against one torch op
DIFFUSION_LARGE_TARGET = 98.0
SAME_BYTES_TARGET = 97.0
CACHED_SAME_BYTES_TARGET = 97.0
HOST_TARGETS = {"rb.apply_cached": 1.4, "rb.apply": 1.6}


def _diffusion_cases(scale: str, device: torch.device) -> list[Case]:
    cases = []
    dtype = torch.bfloat16
    shapes = [(s, "interleaved") for s in DIFFUSION_SHAPES[scale]]
    if not scale.startswith("short"):
        shapes.insert(1, (DIFFUSION_SHAPES[scale][0], "neox"))  # the largest shape in both layouts
    for index, (shape, layout) in enumerate(shapes):
        seq, head_dim = shape[-3], shape[-1]
        gpu_shapes = DIFFUSION_SHAPES["gpu"]
        name = DIFFUSION_NAMES[gpu_shapes.index(shape)] if shape in gpu_shapes else f"small-{index}"
        if layout == "neox":
            name += " neox"
        half = head_dim // 2
        table = cos_sin(torch.arange(seq), head_dim)  # fp32 [S, D/2], built once on the host

        def make(seed, shape=shape, table=table):
            torch.manual_seed(seed)
            x = torch.randn(shape, dtype=dtype, device=device)
            # [S, 1, D/2]: one row per token, broadcast over heads (and batch)
            return {"x": x, "cos": table[0].to(device)[:, None], "sin": table[1].to(device)[:, None]}

        n = math.prod(shape)
        nbytes = 2 * n * 2 + 2 * seq * half * 4
        tokens = n // (shape[-1] * shape[-2])
        cases.append(Case("diffusion", name, "apply", _shape(shape), dtype,
                          layout, tokens, nbytes, make, _ref_apply))
    return cases


def _qk_cases(scale: str, device: torch.device) -> list[Case]:
    """apply_qk in place, neox, q [B, S, Hq, D] and k [B, S, Hk, D], cos/sin fp32 [S, 1, D/2]."""
    cases = []
    dtype = torch.bfloat16
    for shape, k_heads in QK_SHAPES.get(scale, QK_SHAPES["tiny"] if scale == "tiny" else []):
        seq, head_dim = shape[-3], shape[-1]
        k_shape = (*shape[:-2], k_heads, head_dim)
        table = cos_sin(torch.arange(seq), head_dim)

        def make(seed, shape=shape, k_shape=k_shape, table=table):
            torch.manual_seed(seed)
            return {"q": torch.randn(shape, dtype=dtype, device=device),
                    "k": torch.randn(k_shape, dtype=dtype, device=device),
                    "cos": table[0].to(device)[:, None], "sin": table[1].to(device)[:, None]}

        n = math.prod(shape) + math.prod(k_shape)
        nbytes = 2 * n * 2 + 2 * seq * (head_dim // 2) * 4
        tokens = math.prod(shape[:-2])
        cases.append(Case("qk", f"q+k {shape[-3]}x{shape[-2]}/{k_heads}", "apply_qk",
                          _shape(shape, k_shape, names=("q", "k")), dtype, "neox", tokens, nbytes, make, _ref_qk,
                          inplace=True))
    return cases


def _ref_apply(d: dict, layout: str) -> tuple[Tensor, ...]:
    x = d["x"]
    return (reference.rotate(x, d["cos"], d["sin"], Layout(layout), x.shape[-1]),)


def _ref_qk(d: dict, layout: str) -> tuple[Tensor, ...]:
    lay = Layout(layout)
    return (reference.rotate(d["q"], d["cos"], d["sin"], lay, d["q"].shape[-1]),
            reference.rotate(d["k"], d["cos"], d["sin"], lay, d["k"].shape[-1]))


def _ref_cached(d: dict, layout: str) -> tuple[Tensor, ...]:
    axis = d["mrope"].axis_map if d["mrope"] is not None and d["positions"].dim() == 2 else None
    cos, sin = reference.cos_sin_from_cache(d["positions"], d["cache"], axis)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    lay = Layout(layout)
    return (reference.rotate(d["q"], cos, sin, lay, d["q"].shape[-1]),
            reference.rotate(d["k"], cos, sin, lay, d["k"].shape[-1]))


def _ref_backward(d: dict, layout: str) -> tuple[Tensor, ...]:
    g = d["g"]
    return (reference.rotate(g, d["cos"], d["sin"], Layout(layout), g.shape[-1], conjugate=True),)


def _positions(tokens: int, seed: int, max_pos: int, rows: int = 0, random: bool = False) -> Tensor:
    """Deterministic, distinct positions (a stride coprime with the power-of-two max_pos), or with
    ``random`` uniform ones; with ``rows=3`` a [3, T] MRoPE grid, independent on every row (the
    hardest case for a kernel: each row's cache rows are gathered from anywhere)."""
    i = torch.arange(tokens)
    if random:
        g = torch.Generator().manual_seed(1000 + seed)
        return torch.randint(0, max_pos, (rows, tokens) if rows else (tokens,), generator=g)
    if not rows:
        return (i * 7 + 13 + seed) % max_pos
    base = (13 + seed) % (max_pos // 2)
    return torch.stack((base + i // 64, base + (i // 8) % 8, base + i % 8)) % max_pos


_CACHES: dict = {}


def _cache(device: torch.device, max_pos: int, rot: int) -> Tensor:
    key = (str(device), max_pos, rot)
    if key not in _CACHES:
        _CACHES[key] = cos_sin_cache(max_pos, rot).to(device)
    return _CACHES[key]


def _llm_cases(scale: str, device: torch.device, graphs: bool) -> list[Case]:
    cases = []
    dtype = torch.bfloat16
    hq, hk = LLM_HEADS.get(scale, (32, 8))
    d_head = 128
    half = d_head // 2
    max_pos = 1024 if scale == "tiny" else _MAX_POS
    ops = ("apply_cached",) if scale.startswith("short") else ("apply_qk", "apply_cached")
    for op in ops:
        for t in LLM_TOKENS[scale]:
            if op == "apply_qk":
                def make(seed, t=t):
                    torch.manual_seed(seed)
                    cos, sin = cos_sin(_positions(t, seed, max_pos), d_head)
                    return {"q": torch.randn(t, hq, d_head, dtype=dtype, device=device),
                            "k": torch.randn(t, hk, d_head, dtype=dtype, device=device),
                            "cos": cos.to(device)[:, None], "sin": sin.to(device)[:, None]}
                side = 2 * t * half * 4
                ref = _ref_qk
            else:
                def make(seed, t=t):
                    torch.manual_seed(seed)
                    return {"q": torch.randn(t, hq, d_head, dtype=dtype, device=device),
                            "k": torch.randn(t, hk, d_head, dtype=dtype, device=device),
                            "positions": _positions(t, seed, max_pos).to(device),
                            "cache": _cache(device, max_pos, d_head), "mrope": None}
                side = t * 8 + t * d_head * 4
                ref = _ref_cached
            nbytes = 2 * t * (hq + hk) * d_head * 2 + side
            cases.append(Case("llm", f"T={t}", op, _shape((t, hq, d_head), (t, hk, d_head), names=("q", "k")),
                              dtype, "neox", t, nbytes, make, ref,
                              graph=graphs and t <= DECODE_GRAPH_MAX_T))
    return cases


def _mrope_cases(scale: str, device: torch.device) -> list[Case]:
    dtype = torch.bfloat16
    hq, hk = LLM_HEADS.get(scale, (32, 8))
    d_head = 128
    t = MROPE_TOKENS.get(scale, 256)
    max_pos = 1024 if scale == "tiny" else _MAX_POS
    maps = [("plain", None), ("qwen2-vl chunked[16,24,24]", chunked([16, 24, 24])),
            ("qwen3-vl interleaved[24,20,20]", interleaved([24, 20, 20])),
            ("ernie4.5-vl [22,22,20]", ernie([22, 22, 20]))]
    cases = []
    for name, m in maps:
        def make(seed, m=m):
            torch.manual_seed(seed)
            pos = _positions(t, seed, max_pos, rows=3 if m is not None else 0, random=True)
            return {"q": torch.randn(t, hq, d_head, dtype=dtype, device=device),
                    "k": torch.randn(t, hk, d_head, dtype=dtype, device=device),
                    "positions": pos.to(device), "cache": _cache(device, max_pos, d_head), "mrope": m}
        rows = 3 if m is not None else 1
        nbytes = 2 * t * (hq + hk) * d_head * 2 + rows * t * 8 + t * d_head * 4
        cases.append(Case("mrope", name, "apply_cached", _shape((t, hq, d_head), (t, hk, d_head), names=("q", "k")),
                          dtype, "neox", t, nbytes, make, _ref_cached, mrope=m))
    return cases


def _backward_cases(scale: str, device: torch.device) -> list[Case]:
    cases = []
    dtype = torch.bfloat16
    for shape, layout in BACKWARD_SHAPES[scale]:
        seq, head_dim = shape[-3], shape[-1]
        table = cos_sin(torch.arange(seq), head_dim)

        def make(seed, shape=shape, table=table):
            torch.manual_seed(seed)
            return {"x": torch.randn(shape, dtype=dtype, device=device),
                    "g": torch.randn(shape, dtype=dtype, device=device),
                    "cos": table[0].to(device)[:, None], "sin": table[1].to(device)[:, None]}

        n = math.prod(shape)
        nbytes = 2 * n * 2 + 2 * seq * (head_dim // 2) * 4
        tokens = n // (shape[-1] * shape[-2])
        for op, ref in (("forward", _ref_apply), ("backward", _ref_backward)):
            cases.append(Case("backward", f"{layout} {op}", op, _shape(shape), dtype, layout, tokens, nbytes,
                              make, ref))
    return cases


def _dispatch_cases(device: torch.device) -> list[Case]:
    dtype = torch.bfloat16

    def make_apply(seed):
        torch.manual_seed(seed)
        cos, sin = cos_sin(torch.tensor([5]), 128)
        return {"x": torch.randn(1, 8, 128, dtype=dtype, device=device),
                "cos": cos.to(device)[:, None], "sin": sin.to(device)[:, None]}

    def make_cached(seed):
        torch.manual_seed(seed)
        return {"q": torch.randn(1, 32 * 128, dtype=dtype, device=device),
                "k": torch.randn(1, 8 * 128, dtype=dtype, device=device),
                "positions": torch.tensor([17 + seed], device=device),
                "cache": _cache(device, 4096, 128), "mrope": None}

    def ref_cached(d, layout):
        v = dict(d, q=d["q"].view(1, 32, 128), k=d["k"].view(1, 8, 128))
        q, k = _ref_cached(v, layout)
        return q.view(1, -1), k.view(1, -1)

    return [
        Case("dispatch", "apply tiny", "apply", _shape((1, 8, 128)), dtype, "neox", 1,
             2 * 8 * 128 * 2 + 2 * 64 * 4, make_apply, _ref_apply, host=True),
        Case("dispatch", "apply_cached decode", "apply_cached", _shape((1, 4096), (1, 1024), names=("q", "k")),
             dtype, "neox", 1, 2 * 40 * 128 * 2 + 8 + 128 * 4, make_cached, ref_cached, host=True),
    ]


# ------------------------------------------------------------------------------------------------
# peers: written here, from the formulas (no code taken from the projects they stand for)


def _pairs(x: Tensor, layout: str) -> tuple[Tensor, Tensor]:
    if layout == "neox":
        h = x.shape[-1] // 2
        return x[..., :h], x[..., h:]
    return x[..., 0::2], x[..., 1::2]


def _stack_flatten(x: Tensor, cos: Tensor, sin: Tensor, layout: str) -> Tensor:
    """The contiguous formulation (what the NPU backend does): products in fp32, each rounded,
    the halves joined by ``torch.cat`` (neox) or ``torch.stack(...).flatten`` (interleaved), so no
    strided slice is ever written."""
    a, b = _pairs(x, layout)
    a, b, c, s = a.float(), b.float(), cos.float(), sin.float()
    a2 = a * c - b * s
    b2 = b * c + a * s
    out = torch.cat((a2, b2), -1) if layout == "neox" else torch.stack((a2, b2), -1).flatten(-2)
    return out.to(x.dtype)


def _hf_formula(x: Tensor, cos: Tensor, sin: Tensor, neox: bool) -> Tensor:
    """The natural HF/diffusers formula in fp32: ``x * cos + rotate(x) * sin`` with cos/sin in
    the duplicated form (built from the half form inside, as the models do)."""
    xf = x.float()
    if neox:
        c, s = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
        h = x.shape[-1] // 2
        rot = torch.cat((-xf[..., h:], xf[..., :h]), -1)
    else:
        c, s = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
        rot = torch.stack((-xf[..., 1::2], xf[..., 0::2]), -1).flatten(-2)
    return (xf * c + rot * s).to(x.dtype)


def _gather(positions: Tensor, cache: Tensor, axis: Tensor | None) -> tuple[Tensor, Tensor]:
    """cos/sin ``[T, 1, half]`` for the stack+flatten and compiled peers (vLLM forward_native style);
    ``axis``: the MRoPE axis map as a tensor (None: one position per token)."""
    half = cache.shape[1] // 2
    if axis is not None:
        # index_select on the flat positions: advanced indexing with a 2-D index is far slower on CPU
        rows = cache.index_select(0, positions.reshape(-1)).view(*positions.shape, -1)   # [3, T, rot]
        idx = axis.view(1, 1, half).expand(1, rows.shape[1], half)
        cos = rows[..., :half].gather(0, idx)[0]
        sin = rows[..., half:].gather(0, idx)[0]
    else:
        rows = cache.index_select(0, positions)
        cos, sin = rows[:, :half], rows[:, half:]
    return cos.unsqueeze(-2), sin.unsqueeze(-2)


def _liger():
    try:
        from liger_kernel.ops.rope import LigerRopeFunction

        return LigerRopeFunction.apply
    except Exception:
        pass
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        return liger_rotary_pos_emb
    except Exception as exc:
        raise Skip(f"liger-kernel not installed ({type(exc).__name__})") from None


_FLASH = {}


def _flash_attn_rotary():
    """flash-attn's Triton ``rotary_kernel``: from an installed flash-attn, or from the file that
    ``ROPE_BENCH_FLASH_ATTN_ROTARY`` names (flash_attn/ops/triton/rotary.py of a flash-attn source
    tree: importing the package needs its compiled CUDA extension, the kernel does not)."""
    if "kernel" in _FLASH:
        return _FLASH["kernel"]
    kernel = None
    path = os.environ.get("ROPE_BENCH_FLASH_ATTN_ROTARY")
    try:
        if path:
            spec = importlib.util.spec_from_file_location("_rope_bench_flash_attn_rotary", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module("flash_attn.ops.triton.rotary")
        kernel = module.rotary_kernel
    except Exception as exc:
        raise Skip(f"flash-attn rotary kernel not available ({type(exc).__name__}; set "
                   "ROPE_BENCH_FLASH_ATTN_ROTARY to flash_attn/ops/triton/rotary.py)") from None
    _FLASH["kernel"] = kernel
    return kernel


def _flash_attn_launch(kernel, out: Tensor, x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """One launch of flash-attn's rotary_kernel on ``x [B, S, H, D]`` with fp32 ``cos/sin [S, r/2]``,
    with the tile flash-attn's own apply_rotary picks (BLOCK_M 8 for rotary_dim <= 128, else 4;
    BLOCK_H 2) and FMA contraction off (it is bit-exact then)."""
    import triton

    batch, seqlen, nheads, _ = x.shape
    rot = 2 * cos.shape[-1]
    block_m, block_h = (8 if rot <= 128 else 4), 2
    grid = (triton.cdiv(nheads, block_h), triton.cdiv(seqlen, block_m), batch)
    kernel[grid](out, x, cos, sin, None, 0, seqlen, nheads, cos.shape[0],
                 out.stride(0), out.stride(-3), out.stride(-2), out.stride(-1),
                 x.stride(0), x.stride(-3), x.stride(-2), x.stride(-1),
                 rot, False, False, interleaved, False, BLOCK_H=block_h, BLOCK_M=block_m, enable_fp_fusion=False)
    return out


def _flashinfer():
    try:
        import flashinfer
    except Exception as exc:
        raise Skip(f"flashinfer not installed ({type(exc).__name__})") from None
    fn = getattr(flashinfer, "apply_rope_with_cos_sin_cache_inplace", None)
    if fn is None:
        try:
            from flashinfer.rope import apply_rope_with_cos_sin_cache_inplace as fn
        except Exception as exc:
            raise Skip(f"flashinfer has no apply_rope_with_cos_sin_cache_inplace ({exc})") from None
    return fn


def _compiled(fn):
    torch._dynamo.reset()  # a fresh cache per case: never hit the recompile limit (silent eager)
    return torch.compile(fn, dynamic=False)


def _backend_names(device_type: str) -> tuple[list[str], list[dict]]:
    """Backends benchmarked on this device (available and serving it without being named) and
    the others with the reason."""
    names, skipped = [], []
    for info in _backend_infos():
        serves = "*" in info.device_types or device_type in info.device_types
        if not serves:
            if device_type in info.explicit_device_types:
                skipped.append({"implementation": info.name, "reason":
                                f"serves {device_type!r} only when named (a test vehicle, e.g. the Triton "
                                "interpreter or the simulated NPU): not benchmarked"})
            else:
                skipped.append({"implementation": info.name,
                                "reason": f"serves {', '.join(info.device_types)}, not {device_type!r}"})
            continue
        if not info.available:
            skipped.append({"implementation": info.name, "reason": f"unavailable: {info.reason}"})
            continue
        names.append(info.name)
    return names, skipped


def _impls(case: Case, device: torch.device, backend_names: list[str], options: "Options") -> list[Impl]:
    op, layout = case.op, case.layout
    neox = layout == "neox"
    out: list[Impl] = []
    if op == "apply":
        for b in backend_names:
            out.append(Impl(b, "backend", lambda d, b=b: lambda: (apply(d["x"], d["cos"], d["sin"], layout=layout, backend=b),)))
        out.append(Impl("eager-strided", "peer", lambda d: lambda: _ref_apply(d, layout),
                        note="the reference (rope_backends.reference.rotate) called directly"))
        out.append(Impl("eager-stack+flatten", "peer", lambda d: lambda: (_stack_flatten(d["x"], d["cos"], d["sin"], layout),)))

        def compile_prep():
            f = _compiled(lambda x, c, s: _hf_formula(x, c, s, neox))
            return lambda d: lambda: (f(d["x"], d["cos"], d["sin"]),)
        out.append(Impl("torch.compile", "peer", _lazy(compile_prep), note="torch.compile of the fp32 HF-style formula"))

        def liger_prep(d):
            fn = _liger()
            x = d["x"]
            x4 = x if x.dim() == 4 else x[None]
            bsz, seq, _, dim = x4.shape
            k = torch.zeros(bsz, seq, 1, dim, dtype=x.dtype, device=x.device)
            cos = torch.cat((d["cos"][:, 0], d["cos"][:, 0]), -1)[None].contiguous()
            sin = torch.cat((d["sin"][:, 0], d["sin"][:, 0]), -1)[None].contiguous()
            q4, k4 = x4.transpose(1, 2), k.transpose(1, 2)
            return lambda: (fn(q4, k4, cos, sin)[0].transpose(1, 2).reshape(x.shape),)
        out.append(Impl("liger-kernel", "peer", liger_prep, mutates=True, layout="neox",
                        note="neox only: run with layout=neox on the same shape and compared with the neox "
                             "reference; needs a 1-head dummy k and duplicated cos/sin (not counted)"))

        def flash_apply_prep(d):
            kernel = _flash_attn_rotary()
            x = d["x"]
            x4 = x if x.dim() == 4 else x[None]
            if x4.dim() != 4:
                raise Skip("flash-attn rotary: [B, S, H, D] tensors only")
            cos, sin = d["cos"][:, 0].contiguous(), d["sin"][:, 0].contiguous()

            def run_():
                out = torch.empty_like(x4)
                _flash_attn_launch(kernel, out, x4, cos, sin, not neox)
                return (out.view(x.shape),)
            return run_
        out.append(Impl("flash-attn", "peer", flash_apply_prep,
                        note="flash-attn's Triton rotary_kernel launched directly (enable_fp_fusion=False, fp32 "
                             "cos/sin), out of place"))

        def flashinfer_prep(d):
            fn = _flashinfer()
            x = d["x"]
            seq, dim = x.shape[-3], x.shape[-1]
            tokens = x.numel() // (x.shape[-2] * dim)
            pos = torch.arange(seq, device=x.device).repeat(tokens // seq)
            cache = torch.cat((d["cos"][:, 0], d["sin"][:, 0]), -1).float().contiguous()
            q2 = x.view(tokens, -1)
            k2 = torch.zeros(tokens, dim, dtype=x.dtype, device=x.device)
            return lambda: (fn(pos, q2, k2, dim, cache, is_neox=neox), x)[1:]
        out.append(Impl("flashinfer", "peer", flashinfer_prep, mutates=True,
                        note="positions + cos/sin cache form of the same tables; a 1-head dummy k (not counted)"))
    elif op == "apply_qk":
        inplace = case.inplace
        for b in backend_names:
            out.append(Impl(b, "backend", lambda d, b=b: lambda: apply_qk(d["q"], d["k"], d["cos"], d["sin"], layout=layout,
                                                                       inplace=inplace, backend=b), mutates=inplace))
        out.append(Impl("eager-strided", "peer", lambda d: lambda: _ref_qk(d, layout),
                        note="the reference (rope_backends.reference.rotate) called directly"))
        out.append(Impl("eager-stack+flatten", "peer", lambda d: lambda: (
            _stack_flatten(d["q"], d["cos"], d["sin"], layout), _stack_flatten(d["k"], d["cos"], d["sin"], layout))))

        def compile_prep():
            f = _compiled(lambda q, k, c, s: (_hf_formula(q, c, s, neox), _hf_formula(k, c, s, neox)))
            return lambda d: lambda: f(d["q"], d["k"], d["cos"], d["sin"])
        out.append(Impl("torch.compile", "peer", _lazy(compile_prep), note="torch.compile of the fp32 HF-style formula"))

        def liger_prep(d):
            fn = _liger()
            if not neox:
                raise Skip("liger-kernel: neox only")
            q, k = d["q"], d["k"]
            cos = torch.cat((d["cos"][:, 0], d["cos"][:, 0]), -1)[None].contiguous()
            sin = torch.cat((d["sin"][:, 0], d["sin"][:, 0]), -1)[None].contiguous()
            lead = q.dim() == 4  # [B, S, H, D] (qk group) or [T, H, D] (llm group)
            q4 = q.transpose(1, 2) if lead else q[None].transpose(1, 2)   # [B, H, S, D] views
            k4 = k.transpose(1, 2) if lead else k[None].transpose(1, 2)
            if lead:
                return lambda: tuple(t.transpose(1, 2) for t in fn(q4, k4, cos, sin)[:2])
            return lambda: tuple(t.transpose(1, 2)[0] for t in fn(q4, k4, cos, sin)[:2])
        out.append(Impl("liger-kernel", "peer", liger_prep, mutates=True,
                        note="in place; duplicated cos/sin [1, T, D] (not counted)"))

        def flash_prep(d):
            kernel = _flash_attn_rotary()
            q, k = d["q"], d["k"]
            if q.dim() != 4:
                raise Skip("flash-attn rotary: [B, S, H, D] tensors only in this adapter")
            cos, sin = d["cos"][:, 0].contiguous(), d["sin"][:, 0].contiguous()
            return lambda: (_flash_attn_launch(kernel, q, q, cos, sin, not neox),
                            _flash_attn_launch(kernel, k, k, cos, sin, not neox))
        out.append(Impl("flash-attn", "peer", flash_prep, mutates=True,
                        note="flash-attn's Triton rotary_kernel launched directly (enable_fp_fusion=False, fp32 "
                             "cos/sin), in place, one launch for q and one for k"))
    elif op == "apply_cached":
        for b in backend_names:
            out.append(Impl(b, "backend", lambda d, b=b: lambda: apply_cached(
                d["q"], d["k"], d["positions"], d["cache"], layout=layout, mrope=d["mrope"],
                head_dim=128, backend=b), mutates=True))

        def strided_prep(d):
            args, originals = args_for_cached(d["q"], d["k"], d["positions"], d["cache"], layout, None, d["mrope"],
                                              True, 128)
            return lambda: (reference.run(args), originals)[1]
        out.append(Impl("eager-strided", "peer", strided_prep, mutates=True,
                        note="the reference (rope_backends.reference.run) on pre-validated args"))

        def flat_prep(d):
            q, k, pos, cache, m = d["q"], d["k"], d["positions"], d["cache"], d["mrope"]
            qv, kv = _heads(q), _heads(k)
            axis = _axis(m, pos, q.device)

            def run_():
                cos, sin = _gather(pos, cache, axis)
                qv.copy_(_stack_flatten(qv, cos, sin, layout))
                kv.copy_(_stack_flatten(kv, cos, sin, layout))
                return q, k
            return run_
        out.append(Impl("eager-stack+flatten", "peer", flat_prep, mutates=True))

        def compile_prep():
            def native(q, k, pos, cache, axis):
                cos, sin = _gather(pos, cache, axis)
                return _hf_formula(q, cos, sin, neox), _hf_formula(k, cos, sin, neox)
            f = _compiled(native)

            def prep(d):
                q, k, m = d["q"], d["k"], d["mrope"]
                qv, kv = _heads(q), _heads(k)
                axis = _axis(m, d["positions"], q.device)
                shapes = q.shape, k.shape
                return lambda: tuple(o.view(s) for o, s in zip(f(qv, kv, d["positions"], d["cache"], axis), shapes))
            return prep
        out.append(Impl("torch.compile", "peer", _lazy(compile_prep),
                        note="torch.compile of the vLLM forward_native-style gather + HF formula (out of place)"))

        def flashinfer_prep(d):
            fn = _flashinfer()
            if d["mrope"] is not None:
                raise Skip("flashinfer: no MRoPE in apply_rope_with_cos_sin_cache_inplace")
            q, k = d["q"], d["k"]
            q2, k2 = q.view(q.shape[0], -1), k.view(k.shape[0], -1)
            return lambda: (fn(d["positions"], q2, k2, 128, d["cache"], is_neox=neox), q, k)[1:]
        out.append(Impl("flashinfer", "peer", flashinfer_prep, mutates=True, note="in place"))
    elif op in ("forward", "backward"):
        def grad_of(f):
            def prep(d):
                if op == "forward":
                    return lambda: (f(d["x"], d["cos"], d["sin"]),)
                x = d["x"].detach().requires_grad_(True)
                y = f(x, d["cos"], d["sin"])
                g = d["g"]
                return lambda: torch.autograd.grad(y, x, g, retain_graph=True)
            return prep
        for b in backend_names:
            out.append(Impl(b, "backend", grad_of(lambda x, c, s, b=b: apply(x, c, s, layout=layout, backend=b))))
        out.append(Impl("eager-strided", "peer", grad_of(lambda x, c, s: reference.rotate(x, c, s, Layout(layout), x.shape[-1])),
                        note="autograd through the reference"))
        out.append(Impl("eager-stack+flatten", "peer", grad_of(lambda x, c, s: _stack_flatten(x, c, s, layout)),
                        note="autograd through the contiguous formulation"))

        def compile_prep():
            f = _compiled(lambda x, c, s: _hf_formula(x, c, s, neox))
            return grad_of(f)
        out.append(Impl("torch.compile", "peer", _lazy(compile_prep), note="torch.compile of the fp32 HF-style formula (AOTAutograd backward)"))
        out.append(Impl(TORCH_AUTOGRAD_OP, "baseline", grad_of(lambda x, c, s: x * 2.0), checked=False,
                        note="y = x * 2 through autograd (one torch kernel each way, the same bytes): what the "
                             "autograd engine itself costs a backward on this machine"))
    if op in ("apply", "apply_qk", "apply_cached") and case.group in ("diffusion", "qk", "llm"):
        out.append(Impl(SAME_BYTES_COPY, "baseline", lambda d: _same_bytes_copy(case.nbytes, device), checked=False,
                        note="Tensor.copy_ of nbytes/2 into nbytes/2, timed like the rope calls: the copy "
                             "bandwidth this device reaches at the case's size (launch, ramp and tail included)"))
    if options.impls:
        out = [i for i in out if i.name in options.impls]
    if options.skip:
        out = [i for i in out if i.name not in options.skip]
    return out


SAME_BYTES_COPY = "copy-same-bytes"


def _same_bytes_copy(nbytes: int, device: torch.device) -> Callable[[], tuple]:
    """A device copy that reads and writes as many bytes as a case counts (``nbytes`` in all):
    the like-for-like ceiling for a case too small to reach the large-copy bandwidth."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return lambda: (dst.copy_(src),)


def _axis(m: MRope | None, positions: Tensor, device: torch.device) -> Tensor | None:
    if m is None or positions.dim() != 2:
        return None
    return torch.tensor(m.axis_map, device=device)


def _heads(t: Tensor) -> Tensor:
    return t if t.dim() == 3 else t.view(t.shape[0], -1, 128)


def _lazy(factory):
    """A prepare that builds its shared part (a compiled function) at the first input set."""
    state = {}

    def prepare(d):
        if "prep" not in state:
            state["prep"] = factory()
        return state["prep"](d)
    return prepare


# ------------------------------------------------------------------------------------------------
# timing


@dataclass
class Options:
    quick: bool = False
    impls: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    progress: bool = True


class Clock:
    """Times a zero-argument callable on one device; returns microseconds (median)."""

    def __init__(self, device: torch.device, quick: bool):
        self.device = device
        self.type = device.type
        self.quick = quick

    def sync(self) -> None:
        if self.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.type != "cpu":
            mod = getattr(torch, self.type, None)
            if mod is not None and hasattr(mod, "synchronize"):
                mod.synchronize()

    @property
    def method(self) -> str:
        return {"cuda": "do_bench", "cpu": "torch_timer"}.get(self.type, "host_loop")

    def time(self, fn) -> float:
        if self.type == "cuda":
            from triton.testing import do_bench

            warmup, rep = (10, 40) if self.quick else (25, 100)
            return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median")) * 1e3
        if self.type == "cpu":
            from torch.utils.benchmark import Timer

            timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
            return float(timer.blocked_autorange(min_run_time=0.05 if self.quick else 0.2).median) * 1e6
        return statistics.median(self.host_sample(fn) for _ in range(5 if self.quick else 9))

    def graph(self, fn) -> float:
        """Median time per call of ``fn`` replayed in a CUDA graph (many calls per graph)."""
        from triton.testing import do_bench_cudagraph

        rep = 10 if self.quick else 20
        try:
            ms = do_bench_cudagraph(fn, rep=rep, return_mode="median")
        except TypeError:  # a Triton without return_mode
            ms = do_bench_cudagraph(fn, rep=rep)
        return float(ms) * 1e3

    def host_sample(self, fn) -> float:
        """One sample of the wall time per call of back-to-back calls ending with one sync: the
        host cost of a call whenever the device work is shorter than it (CPU: the torch Timer)."""
        if self.type == "cpu":
            from torch.utils.benchmark import Timer

            timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
            return float(timer.blocked_autorange(min_run_time=0.02 if self.quick else 0.05).median) * 1e6
        fn()
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        one = max(time.perf_counter() - start, 1e-6)
        n = max(10, min(5000, int((0.005 if self.quick else 0.02) / one)))
        self.sync()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        self.sync()
        return (time.perf_counter() - start) / n * 1e6

    def host_times(self, fns: Sequence[Callable]) -> list[tuple[float, float]]:
        """(median, min) host time per call of each callable over rounds that alternate between
        them, so that a change of load on the machine biases none against the others."""
        rounds = 5 if self.quick else 11
        samples: list[list[float]] = [[] for _ in fns]
        for _ in range(rounds):
            for i, fn in enumerate(fns):
                samples[i].append(self.host_sample(fn))
        return [(statistics.median(s), min(s)) for s in samples]


def _cache_bytes(device: torch.device) -> int:
    """The last-level cache a working set must exceed not to be measured from cache."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text[:-1]) * 1024 if text.endswith("K") else int(text)
    except Exception:
        return 32 * 2**20


def _buffers(nbytes: int, device: torch.device) -> int:
    """How many input sets to rotate: enough that together they exceed the cache twice over."""
    cap = _ROT_CAP.get(device.type, 8)
    l2 = _cache_bytes(device)
    if nbytes >= 2 * l2:
        return 1
    return max(1, min(cap, math.ceil(4 * l2 / max(nbytes, 1))))


def _rotating(fns: list) -> Callable[[], object]:
    if len(fns) == 1:
        return fns[0]
    state = [0]
    n = len(fns)

    def call():
        i = state[0]
        state[0] = (i + 1) % n
        return fns[i]()
    return call


# ------------------------------------------------------------------------------------------------
# bandwidth, environment


def copy_bandwidth(device: torch.device, quick: bool = False) -> dict:
    """A large copy: bytes read + written over the median time, in GB/s (1e9 bytes)."""
    clock = Clock(device, quick)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        nbytes = int(min(2**30, free // 8))
    else:
        nbytes = (64 if quick else 256) * 2**20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    us = clock.time(lambda: dst.copy_(src))
    method = {"cuda": "device-to-device Tensor.copy_ timed with triton.testing.do_bench (median)",
              "cpu": f"Tensor.copy_ (memcpy) on {torch.get_num_threads()} thread(s), torch.utils.benchmark median"}
    del src, dst
    return {"gbps": 2 * nbytes / us / 1e3, "bytes_per_copy": nbytes, "us": us,
            "method": method.get(device.type, "Tensor.copy_, host loop with a device sync")}


def _cpu_name() -> str:
    name = _pyplatform.processor()
    if not name or name in ("x86_64", "aarch64", "arm64", "i386"):
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except Exception:
            pass
    return name or _pyplatform.machine() or "cpu"


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "vendor": platform.gpu_vendor(),
                "multiprocessors": props.multi_processor_count, "memory_bytes": props.total_memory,
                "l2_bytes": getattr(props, "L2_cache_size", None)}
    if device.type == "cpu":
        return {"type": "cpu", "name": f"{_cpu_name()} ({os.cpu_count()} cores)", "cores": os.cpu_count(),
                "threads": torch.get_num_threads(), "llc_bytes": _cache_bytes(device),
                # other work on the machine slows torch's threaded kernels a lot: keep it with the numbers
                "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    return {"type": device.type, "name": device.type}


def device_label(info: dict) -> str:
    if info["type"] == "cuda":
        base = info["name"]
    elif info["type"] == "cpu":
        base = f"cpu-{_cpu_name()}-{info['cores']}c"
    else:
        base = info["type"]
    return re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except Exception:
        return None


def versions() -> dict:
    return {"rope_backends": __version__, "torch": torch.__version__, "triton": platform.triton_version(),
            "python": _pyplatform.python_version(), "cuda": torch.version.cuda,
            "hip": getattr(torch.version, "hip", None), "liger_kernel": _version("liger-kernel") or _version("liger_kernel"),
            "flashinfer": _version("flashinfer-python") or _version("flashinfer"),
            "matplotlib": _version("matplotlib")}


def default_out_dir() -> Path:
    """bench/results of the checkout this package runs from, else ./bench-results."""
    if (_ROOT / "bench").is_dir():
        return _ROOT / "bench" / "results"
    return Path.cwd() / "bench-results"


# ------------------------------------------------------------------------------------------------
# running


class Progress:
    """One status line on stderr: rewritten in place on a terminal, one line per case otherwise."""

    def __init__(self, enabled: bool, total: int):
        self.enabled = enabled
        self.total = max(total, 1)
        self.done = 0
        self.start = time.perf_counter()
        self.tty = enabled and sys.stderr.isatty()

    def show(self, text: str, case_start: bool = False) -> None:
        if not self.enabled:
            return
        line = f"[{self.done}/{self.total} {time.perf_counter() - self.start:5.0f}s] {text}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line[:160])
            sys.stderr.flush()
        elif case_start:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    def end(self) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _equal(outs: Sequence[Tensor], refs: Sequence[Tensor]) -> bool:
    if len(outs) != len(refs):
        return False
    for o, r in zip(outs, refs):
        if o.shape != r.shape or o.dtype != r.dtype:
            return False
        if o.numel() and bool(bitwise_mismatches(o, r).any()):
            return False
    return True


def _clone(d: dict) -> dict:
    return {k: (v.clone() if isinstance(v, Tensor) and k not in ("cache",) else v) for k, v in d.items()}


def _row(case: Case, impl: Impl, us: float, timing: str, copy_gbps: float, bit_exact, buffers: int) -> dict:
    gbps = case.nbytes / us / 1e3 if us > 0 else None
    row = {
        "group": case.group, "scenario": case.scenario, "op": case.op, "shape": case.shape,
        "dtype": _dtype_name(case.dtype), "layout": impl.layout or case.layout, "tokens": case.tokens,
        "implementation": impl.name, "kind": impl.kind, "timing": timing, "us": us,
        "gbps": gbps, "pct_copy": (100.0 * gbps / copy_gbps) if gbps and copy_gbps else None,
        "bytes": case.nbytes, "bit_exact": bit_exact, "buffers": buffers,
    }
    if impl.note:
        row["note"] = impl.note
    return row


def _run_case(case: Case, impls: list[Impl], clock: Clock, copy_gbps: float, progress: Progress,
              rows: list, skipped: list) -> None:
    device = clock.device
    gpu = clock.type == "cuda"
    progress.show(f"{case.group} {case.scenario} {case.op} {case.shape}", case_start=True)
    nbuf = 1 if case.host else _buffers(case.nbytes, device)
    try:
        sets = [case.make(seed) for seed in range(nbuf)]
    except torch.cuda.OutOfMemoryError as exc:  # type: ignore[attr-defined]
        skipped.append({"group": case.group, "scenario": case.scenario, "reason": f"inputs: out of memory ({exc})"})
        return
    pristine = _clone(sets[0])  # in-place implementations rotate the sets while they are timed
    refs: dict[str, tuple] = {}
    host: list[tuple[Impl, Callable, bool]] = []  # dispatch: timed together at the end
    for impl in impls:
        progress.show(f"{case.group} {case.scenario} {case.op}: {impl.name}")
        layout = impl.layout or case.layout
        try:
            if layout not in refs:
                refs[layout] = tuple(t.detach() for t in case.reference(_clone(pristine), layout))
            exact = None
            if impl.checked:  # bit-exactness, once, on a copy of the first input set
                check = impl.prepare(_clone(pristine))
                outs = check()
                exact = _equal([t.detach() for t in outs], refs[layout])
                del check, outs
            fns = [impl.prepare(s) for s in sets]
            fn = _rotating(fns)
            if case.host:
                fn()
                host.append((impl, fn, exact))
            else:
                rows.append(_row(case, impl, clock.time(fn), clock.method, copy_gbps, exact, len(sets)))
                if case.group == "backward" and gpu:
                    # as a training loop runs it: calls back to back, one sync at the end, so the
                    # host can run ahead of the device (do_bench serialises each call after an L2
                    # flush: the autograd engine's host time then shows in every call)
                    us = statistics.median(clock.host_sample(fn) for _ in range(3 if clock.quick else 7))
                    rows.append(_row(case, impl, us, "back_to_back", copy_gbps, exact, len(sets)))
            if case.graph and gpu:
                sync = _synchronises(fn)
                if sync is not None:  # a capture would fail: say so instead of trying
                    skipped.append({"group": case.group, "scenario": case.scenario, "implementation": impl.name,
                                    "timing": "cuda_graph",
                                    "reason": f"not capturable: a call synchronises with the host ({sync[:160]})"})
                else:
                    try:
                        gus = clock.graph(_rotating([impl.prepare(s) for s in sets]))
                        rows.append(_row(case, impl, gus, "cuda_graph", copy_gbps, exact, len(sets)))
                    except Exception as exc:
                        torch.cuda.synchronize()
                        skipped.append({"group": case.group, "scenario": case.scenario, "implementation": impl.name,
                                        "timing": "cuda_graph",
                                        "reason": f"capture failed: {type(exc).__name__}: {str(exc)[:200]}"})
        except Skip as exc:
            skipped.append({"group": case.group, "scenario": case.scenario, "implementation": impl.name,
                            "reason": str(exc)})
        except Exception as exc:
            if gpu:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            skipped.append({"group": case.group, "scenario": case.scenario, "implementation": impl.name,
                            "reason": f"failed: {type(exc).__name__}: {str(exc)[:300]}"})
        progress.done += 1
    if host:
        progress.show(f"{case.group} {case.scenario}: host time, {len(host)} calls in alternating rounds")
        timing = "torch_timer" if clock.type == "cpu" else "host_loop"
        for (impl, _, exact), (us, best) in zip(host, clock.host_times([fn for _, fn, _ in host])):
            rows.append(dict(_row(case, impl, us, timing, copy_gbps, exact, 1), us_min=best))
    del sets, refs, pristine, host
    if gpu:
        torch.cuda.empty_cache()


def _synchronises(fn) -> str | None:
    """Run ``fn`` once with CUDA sync debugging set to error: the message when it synchronises
    (a host-to-device copy of a Python scalar does), else None."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return None
    except RuntimeError as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    finally:
        torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.synchronize()


_EMPTY = {}


def _empty_kernel():
    """A Triton kernel that does nothing: the floor of a launch."""
    if "k" not in _EMPTY:
        import triton

        @triton.jit
        def empty_kernel(x_ptr):
            pass

        _EMPTY["k"] = empty_kernel
    return _EMPTY["k"]


def _launch_rows(device: torch.device, clock: Clock, copy_gbps: float, skipped: list) -> list[dict]:
    """An empty Triton launch, timed as the rope calls are (do_bench and CUDA-graph replay)."""
    if clock.type != "cuda":
        return []
    try:
        kernel = _empty_kernel()
        x = torch.empty(1, device=device)
        fn = lambda: kernel[(1,)](x)  # noqa: E731
        fn()
        case = Case("llm", "empty launch", "launch", "-", torch.float32, "-", 0, 0, lambda s: {}, None)
        impl = Impl("empty-triton-launch", "baseline", lambda d: fn)
        rows = [_row(case, impl, clock.time(fn), clock.method, copy_gbps, None, 1),
                _row(case, impl, clock.graph(fn), "cuda_graph", copy_gbps, None, 1)]
        for r in rows:
            r["gbps"] = r["pct_copy"] = None
        return rows
    except Exception as exc:
        skipped.append({"group": "llm", "implementation": "empty-triton-launch", "reason": f"failed: {exc}"})
        return []


def _dispatch_impls(case: Case, device: torch.device, backend: str | None) -> list[Impl]:
    """rb.apply (automatic selection) vs the selected backend's forward on pre-validated args vs
    (GPU, triton) the kernel launched directly."""
    impls = []
    if case.op == "apply":
        impls.append(Impl("rb.apply", "backend", lambda d: lambda: (apply(d["x"], d["cos"], d["sin"]),),
                          note="public call, automatic backend selection"))

        def fwd(d):
            b = _get_backend(backend)
            args = args_for_tables((("x", d["x"]),), d["cos"], d["sin"], "neox", None, False)
            return lambda: b.forward(args)
    else:
        impls.append(Impl("rb.apply_cached", "backend", lambda d: lambda: apply_cached(
            d["q"], d["k"], d["positions"], d["cache"], head_dim=128), mutates=True,
            note="public call, automatic backend selection, in place"))

        def fwd(d):
            b = _get_backend(backend)
            args, originals = args_for_cached(d["q"], d["k"], d["positions"], d["cache"], "neox", None, None, True, 128)
            return lambda: (b.forward(args), originals)[1]
    impls.append(Impl(f"{backend}.forward", "backend", fwd, mutates=case.op == "apply_cached",
                      note="the selected backend's forward on pre-validated RopeArgs"))
    def one_op(d):  # what one eager torch op costs the host here, the yardstick of the targets
        x = torch.zeros(64, device=device)
        return lambda: (x.add_(0),)
    impls.append(Impl(TORCH_OP, "baseline", one_op, checked=False,
                      note="x.add_(0) on a 64-element tensor of the device: one torch C++ op, timed the same way"))
    if device.type == "cuda" and backend == "triton":
        def direct(d):
            return _direct_triton(d, case.op)
        impls.append(Impl(_DIRECT, "baseline", direct, mutates=case.op == "apply_cached",
                          note="the compiled Triton kernel's launcher called directly (prebuilt plan, "
                               "current stream passed): the floor of a call's host time"))
    return impls


_DIRECT = "triton compiled launch"
TORCH_OP = "torch add_ (one op)"
TORCH_AUTOGRAD_OP = "torch mul (one op, autograd)"


def _direct_triton(d: dict, op: str):
    """The triton backend's compiled kernel launched with a plan built up front, as its prepared
    runner launches it (``launch.launch_floor``): the floor for the host cost of a call."""
    try:
        from .backends.triton import launch
    except Exception as exc:
        raise Skip(f"triton backend launch module unavailable: {exc}") from None
    if op == "apply":
        args = args_for_tables((("x", d["x"]),), d["cos"], d["sin"], "neox", None, False)
    else:
        args, originals = args_for_cached(d["q"], d["k"], d["positions"], d["cache"], "neox", None, None, True, 128)
    try:
        run_ = launch.launch_floor(args)
    except Exception as exc:
        raise Skip(f"triton direct launch unavailable: {type(exc).__name__}: {exc}") from None
    if op == "apply":
        return run_

    def run_cached():
        run_()
        return originals
    return run_cached


def _rope_index_rows(device: torch.device, skipped: list, progress: Progress) -> list[dict]:
    path = _ROOT / "bench" / "rope_index.py"
    if not path.is_file():
        msg = f"rope_index: {path} not found (a source checkout has it): group skipped"
        print(msg, file=sys.stderr)
        skipped.append({"group": "rope_index", "reason": msg})
        return []
    try:
        spec = importlib.util.spec_from_file_location("_rope_backends_bench_rope_index", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        setups = module.T.SETUPS
    except Exception as exc:
        msg = f"rope_index: could not load {path}: {type(exc).__name__}: {exc}"
        print(msg, file=sys.stderr)
        skipped.append({"group": "rope_index", "reason": msg})
        return []
    rows = []
    for name, setup in setups.items():
        progress.show(f"rope_index {name}", case_start=True)
        try:
            # its quick mode: the full rope_index bench is python bench/rope_index.py
            r = module.bench_one(name, setup, "qwen3_vl", device.type, True)
        except Exception as exc:
            skipped.append({"group": "rope_index", "scenario": name, "reason": f"failed: {type(exc).__name__}: {exc}"})
            continue
        shape = f"B={r['batch']} S={r['seq']} img={r['images']} vid={r['videos']}"
        common = {"group": "rope_index", "scenario": name, "op": "rope_index", "shape": shape, "dtype": "int64",
                  "layout": "-", "tokens": r["batch"] * r["seq"], "timing": "perf_counter", "gbps": None,
                  "pct_copy": None, "bytes": None, "buffers": 1}
        rows.append(dict(common, implementation="loop (transformers 4.x style)", kind="peer",
                         us=r["loop_ms"] * 1e3, bit_exact=True, host_syncs=r["syncs_loop"],
                         note="the oracle of tests/test_positions.py"))
        rows.append(dict(common, implementation="rope_backends.positions.rope_index", kind="backend",
                         us=r["vectorised_ms"] * 1e3, bit_exact=bool(r["equal"]), host_syncs=r["syncs_vectorised"],
                         note="equal to the loop (bit_exact column); host syncs counted by bench/rope_index.py"))
    return rows


def _cases(group: str, scale: str, device: torch.device) -> list[Case]:
    if group == "diffusion":
        return _diffusion_cases(scale, device)
    if group == "qk":
        return _qk_cases(scale, device)
    if group == "llm":
        return _llm_cases(scale, device, graphs=device.type == "cuda")
    if group == "mrope":
        return _mrope_cases(scale, device)
    if group == "backward":
        return _backward_cases(scale, device)
    if group == "dispatch":
        return _dispatch_cases(device)
    return []


def run_device(device: str | torch.device, groups: Sequence[str] = GROUPS, *, quick: bool = False,
               scale: str | None = None, impls: Sequence[str] = (), skip: Sequence[str] = (),
               progress: bool = True, command: str | None = None, short: bool = False,
               budget_s: float | None = None, threads: int | None = None,
               checkpoint: Callable[[dict], None] | None = None) -> dict:
    """Run the chosen groups on one device and return the result document (the JSON's content).

    scale: "gpu" shapes on a GPU, "cpu" shapes elsewhere by default; "tiny" for tests.
    budget_s: once this many seconds have passed, the remaining cases are listed as skipped
    (so a run under a wall-clock limit still writes its results).
    threads: torch CPU threads for this run (default: torch's setting); on a machine that other
    work keeps busy, threaded kernels wait for each other and 1 thread measures more steadily.
    checkpoint: called with the partial document (``"partial": True``) after every case."""
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _run_device(device, groups, quick=quick, scale=scale, impls=impls, skip=skip, progress=progress,
                           command=command, short=short, budget_s=budget_s, checkpoint=checkpoint)
    finally:
        torch.set_num_threads(previous_threads)


def _run_device(device, groups, *, quick, scale, impls, skip, progress, command, short, budget_s, checkpoint) -> dict:
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)  # do_bench and Triton launch on the current device
    for g in groups:
        if g not in GROUPS:
            raise ValueError(f"groups: expected names from {GROUPS}, got {g!r}")
    if scale is None:
        scale = "gpu" if device.type == "cuda" else "cpu"
        if short:
            scale = "short-gpu" if device.type == "cuda" else "short-cpu"
    options = Options(quick=quick or short, impls=tuple(impls), skip=tuple(skip), progress=progress)
    if short:
        options.skip += ("torch.compile", "eager-strided")
    clock = Clock(device, options.quick)
    info = device_info(device)
    t0 = time.perf_counter()
    if progress:
        print(f"rope_backends bench on {info['name']}: measuring copy bandwidth", file=sys.stderr)
    copy = copy_bandwidth(device, quick=options.quick)
    backend_names, skipped = _backend_names(device.type)
    default = backend_names[0] if backend_names else None
    plan = []
    # dispatch first: seconds, and a target of its own, so a time budget never cuts it
    for g in sorted(groups, key=lambda g: g != "dispatch"):
        if g == "rope_index" or (scale.startswith("short") and g in ("mrope", "backward")):
            continue
        plan.extend(_cases(g, scale, device))
    last_llm = next((c for c in reversed(plan) if c.group == "llm"), None)
    total = sum(len(_impls(c, device, backend_names, options)) if not c.host else 3 for c in plan)
    bar = Progress(progress, total)
    rows: list[dict] = []

    def document(partial: bool) -> dict:
        done = [dict(r) for r in rows]
        _add_overheads(done)
        doc = {
            "schema": SCHEMA,
            "date": _dt.date.today().isoformat(),
            "device": info,
            "device_label": device_label(info),
            "versions": versions(),
            "command": command if command is not None else " ".join(getattr(sys, "orig_argv", sys.argv)),
            "quick": options.quick,
            "short": short,
            "scale": scale,
            "groups": list(groups),
            "default_backend": default,
            "copy_bandwidth": copy,
            "byte_counting": BYTE_RULE,
            "timing": {"cuda": "triton.testing.do_bench median (L2 flushed before each call) with rotating input "
                               "buffers; decode sizes also under CUDA-graph replay (do_bench_cudagraph median)",
                       "cpu": "torch.utils.benchmark.Timer.blocked_autorange median, torch threads = "
                              f"{torch.get_num_threads()}",
                       "dispatch": "host time per call of back-to-back calls (CPU: the torch Timer)"},
            "bit_exact_rule": "each implementation's output compared once, bit for bit (all NaNs equal), with "
                              "rope_backends.reference on the same inputs; for the backward group the gradient",
            "rows": done,
            "skipped": list(skipped),
            "elapsed_s": time.perf_counter() - t0,
            "budget_s": budget_s,
            "partial": partial,
        }
        doc["summary"] = summarize(doc)
        return doc

    for case in plan:
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            skipped.append({"group": case.group, "scenario": case.scenario,
                            "reason": f"time budget of {budget_s:.0f} s spent: not run"})
            continue
        if case.host:
            if default is None:
                continue
            case_impls = [i for i in _dispatch_impls(case, device, default)
                          if not options.impls or i.name in options.impls]
        else:
            case_impls = _impls(case, device, backend_names, options)
        _run_case(case, case_impls, clock, copy["gbps"], bar, rows, skipped)
        if case is last_llm:
            rows.extend(_launch_rows(device, clock, copy["gbps"], skipped))
        if checkpoint is not None:  # results so far survive a run that is killed
            checkpoint(document(partial=True))
    if "rope_index" in groups and not short:
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            skipped.append({"group": "rope_index", "reason": f"time budget of {budget_s:.0f} s spent: not run"})
        else:
            rows.extend(_rope_index_rows(device, skipped, bar))
    bar.end()
    return document(partial=False)


def _add_overheads(rows: list[dict]) -> None:
    """Dispatch rows: µs over the backend's forward and over the direct launch."""
    by_scenario: dict[str, dict[str, dict]] = {}
    for r in rows:
        if r["group"] == "dispatch":
            by_scenario.setdefault(r["scenario"], {})[r["kind"] + ":" + r["implementation"]] = r
    for rs in by_scenario.values():
        public = next((r for k, r in rs.items() if r["implementation"].startswith("rb.")), None)
        forward = next((r for r in rs.values() if r["implementation"].endswith(".forward")), None)
        direct = next((r for r in rs.values() if r["implementation"] == _DIRECT), None)
        if public is None:
            continue
        if forward is not None:
            public["overhead_over_forward_us"] = public["us"] - forward["us"]
            if "us_min" in public and "us_min" in forward:  # the least disturbed rounds
                public["overhead_over_forward_us_min"] = public["us_min"] - forward["us_min"]
        if direct is not None:
            public["overhead_over_launch_us"] = public["us"] - direct["us"]
            if "us_min" in public and "us_min" in direct:
                public["overhead_over_launch_us_min"] = public["us_min"] - direct["us_min"]
            if forward is not None:
                forward["overhead_over_launch_us"] = forward["us"] - direct["us"]


# ------------------------------------------------------------------------------------------------
# summary against the targets


def summarize(doc: dict) -> list[dict]:
    """The GPU targets, computed for the device's default backend from this run's rows.
    ``met`` is None where the target is not defined for the device (they are GPU targets)."""
    rows = doc["rows"]
    best = doc.get("default_backend")
    gpu = doc["device"]["type"] == "cuda"
    out = []

    def pick(**kw):
        return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]

    def add(target, value, limit, higher_is_better, text):
        met = None
        if gpu and value is not None and limit is not None:
            met = value >= limit if higher_is_better else value <= limit
        out.append({"target": target, "value": value, "limit": limit, "met": met, "detail": text})

    timing = "do_bench" if gpu else ("torch_timer" if doc["device"]["type"] == "cpu" else "host_loop")

    def same_bytes(r, limit):
        """The rope call against a copy of as many bytes, timed alike (% of that copy's speed)."""
        copy = pick(group=r["group"], scenario=r["scenario"], op=r["op"], shape=r["shape"],
                    implementation=SAME_BYTES_COPY, timing=timing)
        if copy:
            add(f"{r['group']} {r['scenario']} {r['shape']} % of a same-bytes copy", 100.0 * copy[0]["us"] / r["us"],
                limit, True, f"{best} {r['us']:.1f} µs vs copy {copy[0]['us']:.1f} µs "
                             f"({copy[0]['pct_copy']:.0f} % of the large copy's bandwidth)")
    def ratio_to(r, peer, label, limit=1.0):
        """peer time / ours: above 1 we are faster (when the peer ran and was bit-exact or not)."""
        other = pick(group=r["group"], scenario=r["scenario"], implementation=peer, timing=r["timing"])
        if other:
            add(f"{r['group']} {r['scenario']} speedup over {label}", other[0]["us"] / r["us"], limit, True,
                f"{best} {r['us']:.1f} µs vs {label} {other[0]['us']:.1f} µs")

    for r in pick(group="diffusion", implementation=best, timing=timing):
        shape = tuple(int(v) for v in r["shape"].strip("()").split(","))
        if shape == DIFFUSION_SHAPES["gpu"][0]:
            add(f"diffusion {r['scenario']} {r['shape']} % of copy", r["pct_copy"], DIFFUSION_LARGE_TARGET, True,
                f"{best} {r['gbps']:.4g} GB/s")
            same_bytes(r, None)
        else:
            same_bytes(r, SAME_BYTES_TARGET)
        ratio_to(r, "torch.compile", "torch.compile")
        ratio_to(r, "flash-attn", "flash-attn")
    for r in pick(group="qk", implementation=best, timing=timing):
        same_bytes(r, None)
        ratio_to(r, "liger-kernel", "Liger-Kernel")
        ratio_to(r, "flash-attn", "flash-attn")
    for r in pick(group="llm", implementation=best, timing=timing):
        if r["tokens"] >= 4096:
            add(f"llm {r['op']} T={r['tokens']} % of copy", r["pct_copy"], None, True, f"{best} {r['gbps']:.4g} GB/s")
            same_bytes(r, CACHED_SAME_BYTES_TARGET if r["op"] == "apply_cached" else None)
    empty = pick(group="llm", implementation="empty-triton-launch", timing="cuda_graph")
    for r in pick(group="llm", implementation=best, timing="cuda_graph"):
        if empty:
            add(f"llm {r['op']} T={r['tokens']} graph replay / empty launch", r["us"] / empty[0]["us"],
                2.0 if r["tokens"] <= 16 else None, False, f"{r['us']:.2f} µs vs empty {empty[0]['us']:.2f} µs")
    plain = pick(group="mrope", scenario="plain", implementation=best, timing=timing)
    for r in pick(group="mrope", implementation=best, timing=timing):
        if plain and r["scenario"] != "plain":
            add(f"mrope {r['scenario']} / plain", r["us"] / plain[0]["us"], 1.10, False,
                f"{r['us']:.1f} µs vs {plain[0]['us']:.1f} µs")
    for r in pick(group="backward", op="backward", implementation=best):
        fwd = [f for f in pick(group="backward", op="forward", implementation=best, timing=r["timing"])
               if f["shape"] == r["shape"] and f["layout"] == r["layout"]]
        if fwd:
            add(f"backward / forward {r['shape']} {r['layout']} ({r['timing']})", r["us"] / fwd[0]["us"],
                1.10, False, f"{r['us']:.1f} µs vs {fwd[0]['us']:.1f} µs")
    for r in pick(group="dispatch"):
        op_row = [o for o in pick(group="dispatch", scenario=r["scenario"], implementation=TORCH_OP)]
        if r["implementation"].startswith("rb.") and op_row:
            limit = HOST_TARGETS.get(r["implementation"])
            add(f"host time of {r['implementation']} / one torch op ({r['scenario']})", r["us"] / op_row[0]["us"],
                limit, False, f"{r['us']:.2f} µs vs {op_row[0]['us']:.2f} µs per call (x.add_(0))")
        if "overhead_over_launch_us" in r and r["implementation"].startswith("rb."):
            add(f"host overhead of {r['implementation']} over a direct launch ({r['scenario']})",
                r["overhead_over_launch_us"], None, False,
                f"{r['us']:.2f} µs per call; least disturbed round {r.get('overhead_over_launch_us_min', 0):+.2f} µs")
        elif "overhead_over_forward_us" in r:
            add(f"host overhead of {r['implementation']} over {best}.forward ({r['scenario']})",
                r["overhead_over_forward_us"], None, False,
                f"{r['us']:.2f} µs per call; least disturbed round {r.get('overhead_over_forward_us_min', 0):+.2f} µs")
    return out


# ------------------------------------------------------------------------------------------------
# writers


def _fmt(v, digits=1) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def _md_table(headers: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    sep = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def format_tables(doc: dict) -> str:
    """Markdown tables (readable on a terminal): one per group, then the targets."""
    out = []
    copy = doc["copy_bandwidth"]
    dev = doc["device"]
    extra = ""
    if dev["type"] == "cpu":
        extra = f" ({dev.get('threads')} threads, load average {dev.get('load_average_1min') or 0:.1f})"
    out.append(f"device: {dev['name']}{extra}   copy bandwidth: {copy['gbps']:.1f} GB/s (read + write)   "
               f"torch {doc['versions']['torch']}, triton {doc['versions']['triton']}   default backend: "
               f"{doc.get('default_backend')}")
    for group in GROUPS:
        rows = [r for r in doc["rows"] if r["group"] == group]
        if not rows:
            continue
        notes: dict[str, str] = {}
        table = []
        for r in rows:
            name = r["implementation"]
            if r.get("note"):
                notes.setdefault(name, r["note"])
            extra = ""
            if "overhead_over_launch_us" in r:
                extra = f"+{r['overhead_over_launch_us']:.2f} µs over launch"
                if "overhead_over_launch_us_min" in r:
                    extra += f" (min {r['overhead_over_launch_us_min']:+.2f})"
            if "overhead_over_forward_us" in r:
                extra = (extra + "; " if extra else "") + f"+{r['overhead_over_forward_us']:.2f} µs over forward"
                if "overhead_over_forward_us_min" in r:
                    extra += f" (min {r['overhead_over_forward_us_min']:+.2f})"
            if "host_syncs" in r:
                extra = f"host syncs {r['host_syncs']}"
            table.append([r["scenario"], r["op"], r["shape"], r["dtype"], name, r["timing"], _fmt(r["us"], 2),
                          _fmt(r["gbps"]), _fmt(r["pct_copy"]), _fmt(r["bit_exact"]), extra])
        out.append("")
        out.append(f"### {group}")
        out.append(_md_table(["scenario", "op", "shape", "dtype", "implementation", "timing", "µs", "GB/s",
                              "% copy", "bit-exact", ""], table, {6, 7, 8}))
        for name, note in notes.items():
            out.append(f"- {name}: {note}")
    skipped = doc.get("skipped") or []
    if skipped:
        out.append("")
        out.append("not run:")
        seen = set()
        for s in skipped:
            text = f"  {s.get('implementation', s.get('group', ''))}: {s['reason']}"
            if text not in seen:
                seen.add(text)
                out.append(text)
    summary = doc.get("summary") or []
    if doc.get("short") and doc["device"]["type"] != "cuda":
        summary = []  # GPU targets: noise in a newcomer's short CPU table (still in the JSON)
    if summary:
        out.append("")
        out.append("### targets (defined for the GPU; see docs/benchmarks.md)")
        out.append(_md_table(["target", "value", "limit", "met", "detail"],
                             [[s["target"], _fmt(s["value"], 2), _fmt(s["limit"], 2),
                               "-" if s["met"] is None else ("yes" if s["met"] else "NO"), s["detail"]]
                              for s in summary], {1, 2}))
    return "\n".join(out)


def markdown_report(doc: dict, plot: str | None = None) -> str:
    """The README results section: environment, the tables, the plot, how to regenerate."""
    v = doc["versions"]
    copy = doc["copy_bandwidth"]
    lines = [
        f"Measured {doc['date']} on **{doc['device']['name']}** (torch {v['torch']}, triton {v['triton']}; "
        f"default backend `{doc.get('default_backend')}`), command `{doc['command']}`.",
        f"Copy bandwidth {copy['gbps']:.0f} GB/s ({copy['method']}). {doc['byte_counting']}",
        "`bit-exact`: the implementation's output equals `rope_backends.reference` bit for bit on that case.",
        "",
    ]
    body = format_tables(doc).split("\n", 1)[1] if "\n" in format_tables(doc) else ""
    lines.append(body.strip("\n"))
    if plot:
        lines += ["", f"![GB/s per implementation]({plot})"]
    return "\n".join(lines) + "\n"


def write_json(doc: dict, out_dir: str | Path, suffix: str = "") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{doc['device_label']}-{doc['date']}{suffix}.json"
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return path


def write_plot(doc: dict, path: str | Path) -> Path | None:
    """GB/s per implementation: bars per shape for diffusion, lines over tokens for llm. Returns
    None (and writes nothing) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    rows = [r for r in doc["rows"] if r.get("gbps") and r["timing"] in ("do_bench", "torch_timer", "host_loop")]
    diff = [r for r in rows if r["group"] == "diffusion"]
    llm_ops = [op for op in ("apply_qk", "apply_cached") if any(r["group"] == "llm" and r["op"] == op for r in rows)]
    panels = (1 if diff else 0) + len(llm_ops)
    if not panels:
        return None
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.8), squeeze=False)
    axes = list(axes[0])
    copy = doc["copy_bandwidth"]["gbps"]
    if diff:
        ax = axes.pop(0)
        shapes = list(dict.fromkeys(r["shape"] for r in diff))
        names = list(dict.fromkeys(r["implementation"] for r in diff))
        width = 0.8 / max(len(names), 1)
        for j, name in enumerate(names):
            vals = [next((r["gbps"] for r in diff if r["shape"] == s and r["implementation"] == name), 0) for s in shapes]
            ax.bar([i + j * width for i in range(len(shapes))], vals, width, label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))])
        ax.set_xticklabels(shapes, rotation=20, fontsize=7)
        ax.axhline(copy, ls="--", c="k", lw=1, label="copy")
        ax.set_ylabel("GB/s (read + write)")
        ax.set_title("diffusion: apply, bf16, interleaved")
        ax.legend(fontsize=7)
    for op in llm_ops:
        ax = axes.pop(0)
        sel = [r for r in rows if r["group"] == "llm" and r["op"] == op]
        for name in dict.fromkeys(r["implementation"] for r in sel):
            pts = sorted((r["tokens"], r["gbps"]) for r in sel if r["implementation"] == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.axhline(copy, ls="--", c="k", lw=1, label="copy")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_ylabel("GB/s (read + write)")
        ax.set_title(f"llm: {op}, q 32 / k 8 heads, D=128, neox, bf16")
        ax.legend(fontsize=7)
    fig.suptitle(f"rope_backends bench: {doc['device']['name']} ({doc['date']})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# entry points


def present_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    if platform.npu_available():
        devices.append("npu")
    return devices


def run(devices: Sequence[str] | None = None, groups: Sequence[str] = GROUPS, *, quick: bool = False,
        out_dir: str | Path | None = None, scale: str | None = None, impls: Sequence[str] = (),
        skip: Sequence[str] = (), progress: bool = True, command: str | None = None, short: bool = False,
        plot: bool = True, print_tables: bool = True, budget_s: float | None = None,
        threads: int | None = None) -> list[dict]:
    """Run the bench on each device; write ``<out_dir>/<device>-<date>.json`` (+ ``.png``) when
    ``out_dir`` is given; print the tables. Returns the result documents."""
    docs = []
    suffix = "-short" if short else ("-quick" if quick else "")
    if scale == "tiny":
        suffix += "-tiny"
    checkpoint = (lambda partial: write_json(partial, out_dir, suffix)) if out_dir is not None else None
    for dev in devices or present_devices():
        doc = run_device(dev, groups, quick=quick, scale=scale, impls=impls, skip=skip, progress=progress,
                         command=command, short=short, budget_s=budget_s, threads=threads, checkpoint=checkpoint)
        if out_dir is not None:
            path = write_json(doc, out_dir, suffix)
            png = write_plot(doc, path.with_suffix(".png")) if plot else None
            doc["_files"] = [str(path)] + ([str(png)] if png else [])
            if progress:
                print(f"wrote {path}" + (f" and {png.name}" if png else " (no plot: matplotlib not installed)"),
                      file=sys.stderr)
        if print_tables:
            print(format_tables(doc))
            print()
        docs.append(doc)
    return docs


def run_short(devices: list[str] | None = None, out_dir: str | None = None, *, device: str | None = None) -> list[dict]:
    """The short bench of ``python -m rope_backends check --bench``: on each device (default:
    every device present) the copy bandwidth, one diffusion shape, decode and prefill
    ``apply_cached`` and the dispatch overhead, for the backends and the cheap peers (no
    ``torch.compile``: its compile time would dominate). Prints its table; returns the rows
    (each with a ``device`` key). A few seconds on a 2-core CPU.

    ``device``: one device type, the same as ``devices=[device]`` (for callers that have one)."""
    if device is not None:
        devices = [device] if devices is None else list(devices) + [device]
    rows = []
    for doc in run(devices, ("diffusion", "llm", "dispatch"), short=True, out_dir=out_dir,
                   command=" ".join(getattr(sys, "orig_argv", sys.argv)), plot=False):
        for r in doc["rows"]:
            rows.append(dict(r, device=doc["device"]["name"], device_type=doc["device"]["type"]))
    return rows
