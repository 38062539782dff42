"""What the benchmark measures: the cases of every group at every scale, as data and factories.

A :class:`Case` is one benchmarked call: its shapes, dtype, layout, the bytes it must move
(:data:`BYTE_RULE`), ``make(seed)`` building one input set on the device and ``reference(inputs,
layout)`` computing the expected outputs from fresh inputs with :mod:`rope_backends.reference`.
:class:`Impl` is one implementation of a case and :class:`Skip` what an implementation raises
when it cannot run a case here.

Scales: ``gpu`` (the shapes the GPU targets are set on), ``cpu`` (small enough for a laptop),
``tiny`` (tests), ``short-gpu`` / ``short-cpu`` (``python -m rope_backends check --bench``).
The rope_index group's data lives in :mod:`.rope_index`.

This module times nothing, imports no backend and no optional package; it must keep every
shape and byte count of a published run unchanged (results are compared across runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from .. import reference
from ..freqs import cos_sin, cos_sin_cache
from ..mrope import chunked, ernie, interleaved
from ..contract import Layout, MRope

__all__ = ["GROUPS", "BYTE_RULE", "Case", "Impl", "Skip", "cases", "autograd_prepare"]

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

MAX_POS = 32768                     # cache rows for the llm/mrope groups (16 MiB of fp32 at D=128)
HEAD_DIM = 128                      # llm, mrope and dispatch groups: q/k [T, H*128] or [T, H, 128]


class Skip(Exception):
    """An implementation that cannot run this case here (not installed, no such layout...)."""


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
    layers: int = 1             # backward group: L calls in one autograd graph (autograd_prepare)


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


def autograd_prepare(op: str, f: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Callable[[dict], Callable[[], tuple]]:
    """How the backward group calls an implementation ``f(x, cos, sin)``: ``forward`` times
    ``f`` itself, ``backward`` the gradient of one recorded ``f`` at ``x`` for the case's ``g``
    (the graph is kept, so every timed call runs the same backward).

    With ``d["layers"]`` (x and g stacked ``[L, ...]``, one slice per layer, as a model's L
    attention layers each rotate their own q): ``forward`` is L calls of ``f`` one after the
    other, ``backward`` one ``torch.autograd.grad`` through all L recorded calls, so the autograd
    engine's cost of entering and leaving a backward is paid once for L nodes, as in a training
    step. Outputs: one per layer."""
    def prepare(d):
        cos, sin = d["cos"], d["sin"]
        if "layers" in d:
            xs, gs = tuple(d["x"].unbind(0)), tuple(d["g"].unbind(0))
            if op == "forward":
                return lambda: tuple(f(x, cos, sin) for x in xs)
            leaves = tuple(x.detach().requires_grad_(True) for x in xs)
            ys = tuple(f(x, cos, sin) for x in leaves)
            return lambda: torch.autograd.grad(ys, leaves, gs, retain_graph=True)
        if op == "forward":
            return lambda: (f(d["x"], cos, sin),)
        x = d["x"].detach().requires_grad_(True)
        y = f(x, cos, sin)
        g = d["g"]
        return lambda: torch.autograd.grad(y, x, g, retain_graph=True)
    return prepare


def shape_text(*shapes: Sequence[int], names: Sequence[str] = ()) -> str:
    """``(1,16,2,32)`` or, with names, ``q(8,4,128) k(8,2,128)``: the ``shape`` of a row."""
    parts = []
    for i, s in enumerate(shapes):
        text = "(" + ",".join(str(int(v)) for v in s) + ")"
        parts.append(f"{names[i]}{text}" if i < len(names) else text)
    return " ".join(parts)


# --- shapes per scale -------------------------------------------------------------------------

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
# the backward group's model-step rows: this many layers' calls in one backward (a model's
# attention layers each rotate their own q; the engine's entry and exit are paid once for all)
BACKWARD_LAYERS = {"gpu": 8, "cpu": 8, "tiny": 2}
DECODE_GRAPH_MAX_T = 64


# --- expected outputs ---------------------------------------------------------------------------

def _per_layer(out: Tensor, d: dict) -> tuple[Tensor, ...]:
    """One expected output, or with ``d["layers"]`` (the backward group's model-step cases) one per layer."""
    return tuple(out.unbind(0)) if "layers" in d else (out,)


def ref_apply(d: dict, layout: str) -> tuple[Tensor, ...]:
    x = d["x"]
    return _per_layer(reference.rotate(x, d["cos"], d["sin"], Layout(layout), x.shape[-1]), d)


def ref_qk(d: dict, layout: str) -> tuple[Tensor, ...]:
    lay = Layout(layout)
    return (reference.rotate(d["q"], d["cos"], d["sin"], lay, d["q"].shape[-1]),
            reference.rotate(d["k"], d["cos"], d["sin"], lay, d["k"].shape[-1]))


def ref_cached(d: dict, layout: str) -> tuple[Tensor, ...]:
    axis = d["mrope"].axis_map if d["mrope"] is not None and d["positions"].dim() == 2 else None
    cos, sin = reference.cos_sin_from_cache(d["positions"], d["cache"], axis)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    lay = Layout(layout)
    return (reference.rotate(d["q"], cos, sin, lay, d["q"].shape[-1]),
            reference.rotate(d["k"], cos, sin, lay, d["k"].shape[-1]))


def ref_backward(d: dict, layout: str) -> tuple[Tensor, ...]:
    g = d["g"]
    return _per_layer(reference.rotate(g, d["cos"], d["sin"], Layout(layout), g.shape[-1], conjugate=True), d)


# --- inputs -------------------------------------------------------------------------------------

def positions(tokens: int, seed: int, max_pos: int, rows: int = 0, random: bool = False) -> Tensor:
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


# one cos/sin cache per (device, rows, width), shared by every case and input set that reads it
_CACHES: dict = {}


def shared_cache(device: torch.device, max_pos: int, rot: int) -> Tensor:
    key = (str(device), max_pos, rot)
    if key not in _CACHES:
        _CACHES[key] = cos_sin_cache(max_pos, rot).to(device)
    return _CACHES[key]


def _tables(device: torch.device, table: tuple[Tensor, Tensor]) -> dict:
    # [S, 1, D/2]: one row per token, broadcast over heads (and batch)
    return {"cos": table[0].to(device)[:, None], "sin": table[1].to(device)[:, None]}


# --- the groups ---------------------------------------------------------------------------------

def diffusion_cases(scale: str, device: torch.device) -> list[Case]:
    """Single-tensor ``apply``, bf16, interleaved (the largest shape also neox), cos/sin fp32 [S, 1, D/2]."""
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
            return {"x": x, **_tables(device, table)}

        n = math.prod(shape)
        nbytes = 2 * n * 2 + 2 * seq * half * 4
        tokens = n // (shape[-1] * shape[-2])
        cases.append(Case("diffusion", name, "apply", shape_text(shape), dtype,
                          layout, tokens, nbytes, make, ref_apply))
    return cases


def qk_cases(scale: str, device: torch.device) -> list[Case]:
    """apply_qk in place, neox, q [B, S, Hq, D] and k [B, S, Hk, D], cos/sin fp32 [S, 1, D/2]."""
    cases = []
    dtype = torch.bfloat16
    for shape, k_heads in QK_SHAPES.get(scale, []):
        seq, head_dim = shape[-3], shape[-1]
        k_shape = (*shape[:-2], k_heads, head_dim)
        table = cos_sin(torch.arange(seq), head_dim)

        def make(seed, shape=shape, k_shape=k_shape, table=table):
            torch.manual_seed(seed)
            return {"q": torch.randn(shape, dtype=dtype, device=device),
                    "k": torch.randn(k_shape, dtype=dtype, device=device),
                    **_tables(device, table)}

        n = math.prod(shape) + math.prod(k_shape)
        nbytes = 2 * n * 2 + 2 * seq * (head_dim // 2) * 4
        tokens = math.prod(shape[:-2])
        cases.append(Case("qk", f"q+k {shape[-3]}x{shape[-2]}/{k_heads}", "apply_qk",
                          shape_text(shape, k_shape, names=("q", "k")), dtype, "neox", tokens, nbytes, make, ref_qk,
                          inplace=True))
    return cases


def llm_cases(scale: str, device: torch.device, graphs: bool) -> list[Case]:
    """Serving: q [T, 32, 128], k [T, 8, 128] bf16, neox; ``apply_qk`` on gathered tables and
    ``apply_cached`` on positions into a cache; decode sizes also under CUDA graphs."""
    cases = []
    dtype = torch.bfloat16
    hq, hk = LLM_HEADS.get(scale, (32, 8))
    d_head = HEAD_DIM
    half = d_head // 2
    max_pos = 1024 if scale == "tiny" else MAX_POS
    ops = ("apply_cached",) if scale.startswith("short") else ("apply_qk", "apply_cached")
    for op in ops:
        for t in LLM_TOKENS[scale]:
            if op == "apply_qk":
                def make(seed, t=t):
                    torch.manual_seed(seed)
                    cos, sin = cos_sin(positions(t, seed, max_pos), d_head)
                    return {"q": torch.randn(t, hq, d_head, dtype=dtype, device=device),
                            "k": torch.randn(t, hk, d_head, dtype=dtype, device=device),
                            "cos": cos.to(device)[:, None], "sin": sin.to(device)[:, None]}
                side = 2 * t * half * 4
                ref = ref_qk
            else:
                def make(seed, t=t):
                    torch.manual_seed(seed)
                    return {"q": torch.randn(t, hq, d_head, dtype=dtype, device=device),
                            "k": torch.randn(t, hk, d_head, dtype=dtype, device=device),
                            "positions": positions(t, seed, max_pos).to(device),
                            "cache": shared_cache(device, max_pos, d_head), "mrope": None}
                side = t * 8 + t * d_head * 4
                ref = ref_cached
            nbytes = 2 * t * (hq + hk) * d_head * 2 + side
            cases.append(Case("llm", f"T={t}", op, shape_text((t, hq, d_head), (t, hk, d_head), names=("q", "k")),
                              dtype, "neox", t, nbytes, make, ref,
                              graph=graphs and t <= DECODE_GRAPH_MAX_T))
    return cases


def mrope_cases(scale: str, device: torch.device) -> list[Case]:
    """apply_cached with the three MRoPE axis maps (random [3, T] positions) next to plain positions."""
    dtype = torch.bfloat16
    hq, hk = LLM_HEADS.get(scale, (32, 8))
    d_head = HEAD_DIM
    t = MROPE_TOKENS.get(scale, 256)
    max_pos = 1024 if scale == "tiny" else MAX_POS
    maps = [("plain", None), ("qwen2-vl chunked[16,24,24]", chunked([16, 24, 24])),
            ("qwen3-vl interleaved[24,20,20]", interleaved([24, 20, 20])),
            ("ernie4.5-vl [22,22,20]", ernie([22, 22, 20]))]
    cases = []
    for name, m in maps:
        def make(seed, m=m):
            torch.manual_seed(seed)
            pos = positions(t, seed, max_pos, rows=3 if m is not None else 0, random=True)
            return {"q": torch.randn(t, hq, d_head, dtype=dtype, device=device),
                    "k": torch.randn(t, hk, d_head, dtype=dtype, device=device),
                    "positions": pos.to(device), "cache": shared_cache(device, max_pos, d_head), "mrope": m}
        rows = 3 if m is not None else 1
        nbytes = 2 * t * (hq + hk) * d_head * 2 + rows * t * 8 + t * d_head * 4
        cases.append(Case("mrope", name, "apply_cached",
                          shape_text((t, hq, d_head), (t, hk, d_head), names=("q", "k")),
                          dtype, "neox", t, nbytes, make, ref_cached, mrope=m))
    return cases


def backward_cases(scale: str, device: torch.device) -> list[Case]:
    """The autograd backward of ``apply`` next to its forward, on the same inputs (x, gradient g)."""
    cases = []
    dtype = torch.bfloat16
    for shape, layout in BACKWARD_SHAPES[scale]:
        seq, head_dim = shape[-3], shape[-1]
        table = cos_sin(torch.arange(seq), head_dim)

        def make(seed, shape=shape, table=table):
            torch.manual_seed(seed)
            return {"x": torch.randn(shape, dtype=dtype, device=device),
                    "g": torch.randn(shape, dtype=dtype, device=device),
                    **_tables(device, table)}

        n = math.prod(shape)
        nbytes = 2 * n * 2 + 2 * seq * (head_dim // 2) * 4
        tokens = n // (shape[-1] * shape[-2])
        for op, ref in (("forward", ref_apply), ("backward", ref_backward)):
            cases.append(Case("backward", f"{layout} {op}", op, shape_text(shape), dtype, layout, tokens, nbytes,
                              make, ref))
        layers = BACKWARD_LAYERS[scale]

        def make_layers(seed, shape=shape, table=table, layers=layers):
            torch.manual_seed(seed)
            return {"x": torch.randn((layers, *shape), dtype=dtype, device=device),
                    "g": torch.randn((layers, *shape), dtype=dtype, device=device),
                    "layers": layers, **_tables(device, table)}

        for op, ref in (("forward", ref_apply), ("backward", ref_backward)):
            cases.append(Case("backward", f"{layout} {op}, {layers} layers", op, f"{layers} x {shape_text(shape)}",
                              dtype, layout, layers * tokens, layers * nbytes, make_layers, ref, layers=layers))
    return cases


def dispatch_cases(device: torch.device) -> list[Case]:
    """Host time of one small call: ``apply`` on (1, 8, 128) and a decode ``apply_cached`` in place."""
    dtype = torch.bfloat16

    def make_apply(seed):
        torch.manual_seed(seed)
        cos, sin = cos_sin(torch.tensor([5]), HEAD_DIM)
        return {"x": torch.randn(1, 8, HEAD_DIM, dtype=dtype, device=device),
                "cos": cos.to(device)[:, None], "sin": sin.to(device)[:, None]}

    def make_cached(seed):
        torch.manual_seed(seed)
        return {"q": torch.randn(1, 32 * HEAD_DIM, dtype=dtype, device=device),
                "k": torch.randn(1, 8 * HEAD_DIM, dtype=dtype, device=device),
                "positions": torch.tensor([17 + seed], device=device),
                "cache": shared_cache(device, 4096, HEAD_DIM), "mrope": None}

    def ref_flat_cached(d, layout):
        v = dict(d, q=d["q"].view(1, 32, HEAD_DIM), k=d["k"].view(1, 8, HEAD_DIM))
        q, k = ref_cached(v, layout)
        return q.view(1, -1), k.view(1, -1)

    return [
        Case("dispatch", "apply tiny", "apply", shape_text((1, 8, 128)), dtype, "neox", 1,
             2 * 8 * 128 * 2 + 2 * 64 * 4, make_apply, ref_apply, host=True),
        Case("dispatch", "apply_cached decode", "apply_cached", shape_text((1, 4096), (1, 1024), names=("q", "k")),
             dtype, "neox", 1, 2 * 40 * 128 * 2 + 8 + 128 * 4, make_cached, ref_flat_cached, host=True),
    ]


def cases(group: str, scale: str, device: torch.device) -> list[Case]:
    """The cases of one group (none for rope_index: it has rows of its own, see :mod:`.rope_index`)."""
    if group == "diffusion":
        return diffusion_cases(scale, device)
    if group == "qk":
        return qk_cases(scale, device)
    if group == "llm":
        return llm_cases(scale, device, graphs=device.type == "cuda")
    if group == "mrope":
        return mrope_cases(scale, device)
    if group == "backward":
        return backward_cases(scale, device)
    if group == "dispatch":
        return dispatch_cases(device)
    return []
