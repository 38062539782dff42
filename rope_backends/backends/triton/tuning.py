"""Tiles for ``rope_kernel``: a measured table per GPU, a rule from the GPU's properties otherwise.

A tile is ``BLOCK_T`` rows x ``BLOCK_H`` heads per program and ``num_warps``. What is stored and
tuned is not a tile but three numbers that carry over between head counts and head dims
(:class:`TileParams`): ``units`` (rows x heads a program takes), ``block_h`` (the most heads a
program takes; fewer when the head counts do not divide by it) and ``vec_bytes`` (bytes each
thread moves per access: 16 makes every load and store one 128-bit instruction). They are kept
per *shape class* (:class:`ShapeClass`: positions or tables, layout, element size, rotated width,
size), since the best tile of a decode step and of a 100k-token video differ.

Where a call's tile comes from, first found wins:

1. a file written by ``python -m rope_backends tune`` for this GPU in the user's cache directory
   (``$ROPE_BACKENDS_CACHE_DIR``, else ``$XDG_CACHE_HOME/rope_backends``, else
   ``~/.cache/rope_backends``), under ``triton-tiles/<device key>.json``;
2. the table shipped for this GPU (``tiles/<device key>.json`` beside this module);
3. :func:`rule`: the same three numbers from the GPU's multiprocessor count.

A table is keyed by what torch reports of the GPU (:func:`device_key`: name, compute capability,
multiprocessor count, L2 size). Nothing here ever times anything during a call: tables are read
once per device, the tuner (:mod:`rope_backends.backends.triton.tune`) runs only when asked to.

This module imports neither triton nor the kernel; it may be imported on a machine without a GPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, NamedTuple

import torch

__all__ = ["Tile", "TileParams", "Shape", "ShapeClass", "tile_for", "keep_tables", "rule", "device_key",
           "table_for", "user_table_path", "SCHEMA", "SIZES"]

log = logging.getLogger("rope_backends")

SCHEMA = "rope_backends.triton-tiles/1"
# what a table's numbers mean: bumped whenever the kernel's tiling changes, so an older file is
# not read as if it described this kernel
TILE_FORMAT = 1
SIZES = ("decode", "small", "medium", "large")
KINDS = ("table", "cached", "mrope")
_SHIPPED = Path(__file__).with_name("tiles")


class Tile(NamedTuple):
    """A concrete launch tile."""

    block_t: int
    block_h: int
    num_warps: int


@dataclass(frozen=True)
class TileParams:
    """The tuned numbers (see the module docstring)."""

    units: int
    block_h: int
    vec_bytes: int

    def __post_init__(self) -> None:
        for name in ("units", "block_h", "vec_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v & (v - 1):
                raise ValueError(f"{name}: expected a power of two >= 1, got {v!r}")


@dataclass(frozen=True)
class Shape:
    """What the tile of a call depends on (launch.py fills it from the plan)."""

    kind: str                # "table" (cos/sin) | "cached" (positions into a cache) | "mrope" (3-row positions)
    interleaved: bool
    elem_bytes: int          # of q/k
    rot: int                 # rotary_dim
    head_dim: int
    copy_pass: bool
    rows: int                # collapsed leading dims (tokens)
    heads: tuple[int, ...]   # q's (and k's)
    cos_per_head: bool = False

    @property
    def width(self) -> int:
        """Pairs per unit, rounded up to a power of two (the kernel's BLOCK_HALF)."""
        return _pow2(self.rot // 2)

    @property
    def units(self) -> int:
        return self.rows * sum(self.heads)

    def shape_class(self) -> "ShapeClass":
        elems = self.units * self.head_dim
        if self.rows <= 64:
            size = "decode"
        elif elems <= 1 << 21:
            size = "small"
        elif elems <= 1 << 26:
            size = "medium"
        else:
            size = "large"
        return ShapeClass(self.kind, self.interleaved, self.elem_bytes, min(max(self.width, 32), 128), size)


@dataclass(frozen=True)
class ShapeClass:
    """The key of a table entry: calls of one class share tile parameters."""

    kind: str
    interleaved: bool
    elem_bytes: int
    width: int               # 32 (head_dim <= 64), 64 (128), 128 (256 and up)
    size: str                # one of SIZES: decode (<= 64 tokens), small, medium, large

    def label(self) -> str:
        layout = "interleaved" if self.interleaved else "neox"
        return f"{self.kind}/{layout}/{8 * self.elem_bytes}-bit/half{self.width}/{self.size}"


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def _pow2_factor(n: int) -> int:
    """The largest power of two dividing n (n >= 1)."""
    return n & -n


# --------------------------------------------------------------------------------------------
# from parameters to a tile

def concrete(shape: Shape, params: TileParams, sms: int, rocm: bool = False) -> Tile:
    """The tile for ``shape`` from tile parameters: BLOCK_H the largest power of two <=
    ``params.block_h`` dividing every head count (no masked heads), BLOCK_T the rest of
    ``params.units``; both shrunk until the grid fills the GPU (>= 2 programs per multiprocessor
    where the call has that much work); warps so that each thread moves ``vec_bytes`` per access."""
    heads = [h for h in shape.heads if h > 0] or [1]
    gcd = 0
    for h in heads:
        gcd = math.gcd(gcd, h)
    block_h = max(1, min(params.block_h, _pow2_factor(gcd), _pow2(max(heads))))
    block_t = max(1, params.units // block_h)
    block_t = min(block_t, _pow2(shape.rows))

    def programs(bt: int, bh: int) -> int:
        return -(-shape.rows // bt) * sum(-(-h // bh) for h in heads)

    want = 2 * sms
    while programs(block_t, block_h) < want and (block_t > 1 or block_h > 1):
        if block_t > 1:
            block_t //= 2
        else:
            block_h //= 2
    seg = 2 * shape.width if shape.interleaved else shape.width  # contiguous elements per access
    per_access = block_t * block_h * seg * shape.elem_bytes
    threads = max(32, per_access // params.vec_bytes)
    num_warps = min(8, _pow2_floor(threads // 32))
    if rocm:
        num_warps = max(1, num_warps // 2)  # a wavefront is 64 lanes: the same threads per program
    return Tile(block_t, block_h, num_warps)


def rule(cls: ShapeClass) -> TileParams:
    """Tile parameters from nothing but the class (the multiprocessor count enters in
    :func:`concrete`): tiles of about 2,048 elements (4,096 with positions, whose dependent
    position -> cache loads want more work per program), up to 8 heads sharing their cos/sin,
    128-bit accesses."""
    if cls.size == "decode":
        return TileParams(units=8, block_h=8, vec_bytes=16)
    elems = 2048 if cls.kind == "table" else 4096  # MRoPE: three cache rows per row, shared by 8 heads
    units = _pow2_floor(max(1, elems // (2 * cls.width)))
    return TileParams(units=units, block_h=8, vec_bytes=16)


# --------------------------------------------------------------------------------------------
# tables

def _device_props(index: int):
    return torch.cuda.get_device_properties(index)


def device_key(index: int | None = None, props=None) -> str:
    """``<name>-sm<major><minor>-<sms>sm-<L2 MiB>mb``, lower case, e.g.
    ``nvidia-h200-sm90-132sm-60mb``: what a table is matched on."""
    if props is None:
        props = _device_props(torch.cuda.current_device() if index is None else index)
    name = re.sub(r"[^a-z0-9]+", "-", props.name.lower()).strip("-")
    l2 = getattr(props, "L2_cache_size", 0) // (1 << 20)
    return f"{name}-sm{props.major}{props.minor}-{props.multi_processor_count}sm-{l2}mb"


def cache_dir() -> Path:
    base = os.environ.get("ROPE_BACKENDS_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "rope_backends"


def user_table_path(key: str) -> Path:
    return cache_dir() / "triton-tiles" / f"{key}.json"


def shipped_table_path(key: str) -> Path:
    return _SHIPPED / f"{key}.json"


@dataclass(frozen=True)
class Table:
    """A device's tile parameters per shape class, and where they came from."""

    source: str                                  # "user file", "shipped table", "rule"
    path: str | None
    entries: dict                                # ShapeClass -> TileParams
    device: dict

    def params(self, cls: ShapeClass) -> TileParams:
        hit = self.entries.get(cls)
        if hit is not None:
            return hit
        # the nearest measured class of the same kind, layout and size (width, then element size)
        near = [c for c in self.entries if (c.kind, c.interleaved, c.size) == (cls.kind, cls.interleaved, cls.size)]
        if near:
            best = min(near, key=lambda c: (abs(math.log2(c.width / cls.width)), abs(c.elem_bytes - cls.elem_bytes)))
            return self.entries[best]
        return rule(cls)


def parse_table(doc: object, where: str) -> dict:
    """``{ShapeClass: TileParams}`` from a table document; ValueError naming what is wrong."""
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ValueError(f"{where}: expected a document with schema {SCHEMA!r}, got {type(doc).__name__} "
                         f"with schema {doc.get('schema') if isinstance(doc, dict) else None!r}")
    if doc.get("tile_format") != TILE_FORMAT:
        raise ValueError(f"{where}: expected tile_format {TILE_FORMAT} (this kernel), got {doc.get('tile_format')!r}; "
                         "re-run python -m rope_backends tune")
    entries = {}
    for n, entry in enumerate(doc.get("entries", [])):
        try:
            c = entry["class"]
            cls = ShapeClass(str(c["kind"]), bool(c["interleaved"]), int(c["elem_bytes"]), int(c["width"]),
                             str(c["size"]))
            if cls.kind not in KINDS or cls.size not in SIZES:
                raise ValueError(f"class {c!r}")
            p = entry["params"]
            entries[cls] = TileParams(int(p["units"]), int(p["block_h"]), int(p["vec_bytes"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: entry {n}: expected a class and params, got {entry!r} ({exc})") from None
    return entries


def entry_doc(cls: ShapeClass, params: TileParams, **measured) -> dict:
    return {"class": asdict(cls), "params": asdict(params), **measured}


_TABLES: dict[int, Table] = {}


def table_for(index: int) -> Table:
    """The table for GPU ``index``, read once per process."""
    table = _TABLES.get(index)
    if table is None:
        table = _TABLES[index] = _load(index)
    return table


def reload() -> None:
    """Forget the tables read so far (after ``tune`` wrote a new file)."""
    _TABLES.clear()


def _load(index: int) -> Table:
    props = _device_props(index)
    key = device_key(props=props)
    device = {"key": key, "name": props.name, "capability": [props.major, props.minor],
              "sms": props.multi_processor_count, "l2_bytes": getattr(props, "L2_cache_size", 0)}
    for source, path in (("user file", user_table_path(key)), ("shipped table", shipped_table_path(key))):
        if not path.is_file():
            continue
        try:
            entries = parse_table(json.loads(path.read_text()), str(path))
        except (OSError, ValueError) as exc:
            log.warning("rope_backends: ignoring the tile table %s: %s", path, exc)
            continue
        return Table(source, str(path), entries, device)
    return Table("rule", None, {}, device)


def tile_for(shape: Shape, device: torch.device) -> Tile:
    """The tile of a call on ``device`` (a CUDA/ROCm device; the interpreter takes as few
    programs as possible, each costing milliseconds of Python)."""
    from ... import environment

    if device.type != "cuda" or environment.triton_interpret():
        return _interpreter_tile(shape)
    index = device.index if device.index is not None else torch.cuda.current_device()
    table = table_for(index)
    cls = shape.shape_class()
    return concrete(shape, table.params(cls), table.device["sms"], environment.gpu_vendor() == "rocm")


# cos/sin (or the cache rows) of a call are loaded evict_last while they take at most this share
# of L2. bench/studies/cache_hints.py on the H200 (60 MiB L2), persisting lines reset before every
# flush, two runs on two machines: kept tables of 1-2 MB were 0-4 % faster in both (re-read by a
# batch of 2, by q's and k's head blocks, by MRoPE's three rows); of 8 MB -0.7 % and +3.8 %; of
# 17 MB -3.7 / -2.9 % in one run and +0.7 / +2.0 % in the other; of 59 MB (115,200 tokens)
# 1.7-1.9 % slower interleaved in both: kept lines that fill L2 evict the stream instead.
KEEP_TABLES_SHARE = 4


def keep_tables(table_bytes: int, device: torch.device) -> bool:
    """Whether a call on ``device`` whose cos/sin (or gathered cache rows) come to ``table_bytes``
    loads them evict_last (the kernel's ``KEEP_TABLES``): while they take at most
    1/:data:`KEEP_TABLES_SHARE` of the GPU's L2 (15.7 MB on an H200). Never on the interpreter
    (no cache to keep them in) or where the L2 size is unknown."""
    from ... import environment

    if device.type != "cuda" or environment.triton_interpret():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    l2 = int(table_for(index).device.get("l2_bytes") or 0)
    return 0 < table_bytes <= l2 // KEEP_TABLES_SHARE


def _interpreter_tile(shape: Shape) -> Tile:
    """Few programs: all heads of a tensor and as many rows as keep a tile near 8,192 elements."""
    heads = max(shape.heads) if shape.heads else 1
    block_h = _pow2(heads)
    per_row = block_h * (2 * shape.width + (_pow2(shape.head_dim - shape.rot) if shape.copy_pass else 0))
    block_t = min(_pow2(max(1, shape.rows)), _pow2_floor(max(1, 8192 // per_row)))
    return Tile(block_t, block_h, 1)


def classes() -> Iterable[ShapeClass]:
    """Every shape class a table may hold."""
    for kind in KINDS:
        for interleaved in (False, True):
            for elem_bytes in (2, 4):
                for width in (32, 64, 128):
                    for size in SIZES:
                        yield ShapeClass(kind, interleaved, elem_bytes, width, size)
