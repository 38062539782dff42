"""The peers: every implementation the benchmark sets rope_backends against that is not its own.

``torch.compile`` of the HF/diffusers formula (and of vLLM's ``forward_native`` gather for
positions), Liger-Kernel's ``LigerRopeFunction``, flash-attn's Triton ``rotary_kernel`` (from an
installed flash-attn or the file ``ROPE_BENCH_FLASH_ATTN_ROTARY`` names) and FlashInfer's
``apply_rope_with_cos_sin_cache_inplace``. Each is written here from the project's documented
call (no code taken from them), adapted to the case's inputs; an optional package that is not
importable raises :class:`~.scenarios.Skip` with the reason, so the run lists it instead of
dropping it silently.

This module must not import an optional package at import time, and holds nothing that
rope_backends ships (the package's own code is called from :mod:`.implementations`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch
from torch import Tensor

from ..contract import MRope
from ..mrope import axis_tensor
from .scenarios import HEAD_DIM, Impl, Skip, autograd_prepare

__all__ = ["for_case", "hf_formula", "gather"]

COMPILE = "torch.compile"


def hf_formula(x: Tensor, cos: Tensor, sin: Tensor, neox: bool) -> Tensor:
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


def gather(positions: Tensor, cache: Tensor, axis: Tensor | None) -> tuple[Tensor, Tensor]:
    """cos/sin ``[T, 1, half]`` for the compiled peer (vLLM forward_native style); ``axis``: the
    MRoPE axis map as a tensor (None: one position per token)."""
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


def _axis(m: MRope | None, positions: Tensor, device: torch.device) -> Tensor | None:
    if m is None or positions.dim() != 2:
        return None
    return axis_tensor(m.axis_map, device)


def _heads(t: Tensor) -> Tensor:
    return t if t.dim() == 3 else t.view(t.shape[0], -1, HEAD_DIM)


def _compiled(fn):
    torch._dynamo.reset()  # a fresh cache per case: never hit the recompile limit (silent eager)
    return torch.compile(fn, dynamic=False)


def _lazy(factory):
    """A prepare that builds its shared part (a compiled function) at the first input set."""
    state = {}

    def prepare(d):
        if "prep" not in state:
            state["prep"] = factory()
        return state["prep"](d)
    return prepare


# --- optional packages ----------------------------------------------------------------------------

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
    # flash-attn's argument order (OUT, X, COS, SIN, CU_SEQLENS, SEQLEN_OFFSETS, seqlen, nheads,
    # seqlen_ro, strides of OUT then X, rotary_dim, IS_SEQLEN_OFFSETS_TENSOR, IS_VARLEN,
    # INTERLEAVED, CONJUGATE): theirs, not rope_backends' kernel
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


def _duplicated(half: Tensor) -> Tensor:
    """``[S, 1, r/2]`` half-form table -> Liger's duplicated ``[1, S, r]``."""
    return torch.cat((half[:, 0], half[:, 0]), -1)[None].contiguous()


# --- per op ---------------------------------------------------------------------------------------

_COMPILE_NOTE = "torch.compile of the fp32 HF-style formula"
_FLASH_NOTE = "flash-attn's Triton rotary_kernel launched directly (enable_fp_fusion=False, fp32 cos/sin)"


def _apply_peers(layout: str) -> list[Impl]:
    neox = layout == "neox"

    def compile_prep():
        f = _compiled(lambda x, c, s: hf_formula(x, c, s, neox))
        return lambda d: lambda: (f(d["x"], d["cos"], d["sin"]),)

    def liger_prep(d):
        fn = _liger()
        x = d["x"]
        x4 = x if x.dim() == 4 else x[None]
        bsz, seq, _, dim = x4.shape
        k = torch.zeros(bsz, seq, 1, dim, dtype=x.dtype, device=x.device)
        cos, sin = _duplicated(d["cos"]), _duplicated(d["sin"])
        q4, k4 = x4.transpose(1, 2), k.transpose(1, 2)
        return lambda: (fn(q4, k4, cos, sin)[0].transpose(1, 2).reshape(x.shape),)

    def flash_prep(d):
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

    return [
        Impl(COMPILE, "peer", _lazy(compile_prep), note=_COMPILE_NOTE),
        Impl("liger-kernel", "peer", liger_prep, mutates=True, layout="neox",
             note="neox only: run with layout=neox on the same shape and compared with the neox "
                  "reference; needs a 1-head dummy k and duplicated cos/sin (not counted)"),
        Impl("flash-attn", "peer", flash_prep, note=_FLASH_NOTE + ", out of place"),
        Impl("flashinfer", "peer", flashinfer_prep, mutates=True,
             note="positions + cos/sin cache form of the same tables; a 1-head dummy k (not counted)"),
    ]


def _qk_peers(layout: str) -> list[Impl]:
    neox = layout == "neox"

    def compile_prep():
        f = _compiled(lambda q, k, c, s: (hf_formula(q, c, s, neox), hf_formula(k, c, s, neox)))
        return lambda d: lambda: f(d["q"], d["k"], d["cos"], d["sin"])

    def liger_prep(d):
        fn = _liger()
        if not neox:
            raise Skip("liger-kernel: neox only")
        q, k = d["q"], d["k"]
        cos, sin = _duplicated(d["cos"]), _duplicated(d["sin"])
        lead = q.dim() == 4  # [B, S, H, D] (qk group) or [T, H, D] (llm group)
        q4 = q.transpose(1, 2) if lead else q[None].transpose(1, 2)   # [B, H, S, D] views
        k4 = k.transpose(1, 2) if lead else k[None].transpose(1, 2)
        if lead:
            return lambda: tuple(t.transpose(1, 2) for t in fn(q4, k4, cos, sin)[:2])
        return lambda: tuple(t.transpose(1, 2)[0] for t in fn(q4, k4, cos, sin)[:2])

    def flash_prep(d):
        kernel = _flash_attn_rotary()
        q, k = d["q"], d["k"]
        if q.dim() != 4:
            raise Skip("flash-attn rotary: [B, S, H, D] tensors only in this adapter")
        cos, sin = d["cos"][:, 0].contiguous(), d["sin"][:, 0].contiguous()
        return lambda: (_flash_attn_launch(kernel, q, q, cos, sin, not neox),
                        _flash_attn_launch(kernel, k, k, cos, sin, not neox))

    return [
        Impl(COMPILE, "peer", _lazy(compile_prep), note=_COMPILE_NOTE),
        Impl("liger-kernel", "peer", liger_prep, mutates=True, note="in place; duplicated cos/sin [1, T, D] (not counted)"),
        Impl("flash-attn", "peer", flash_prep, mutates=True,
             note=_FLASH_NOTE + ", in place, one launch for q and one for k"),
    ]


def _cached_peers(layout: str) -> list[Impl]:
    neox = layout == "neox"

    def compile_prep():
        def native(q, k, pos, cache, axis):
            cos, sin = gather(pos, cache, axis)
            return hf_formula(q, cos, sin, neox), hf_formula(k, cos, sin, neox)
        f = _compiled(native)

        def prep(d):
            q, k, m = d["q"], d["k"], d["mrope"]
            qv, kv = _heads(q), _heads(k)
            axis = _axis(m, d["positions"], q.device)
            shapes = q.shape, k.shape
            return lambda: tuple(o.view(s) for o, s in zip(f(qv, kv, d["positions"], d["cache"], axis), shapes))
        return prep

    def flashinfer_prep(d):
        fn = _flashinfer()
        if d["mrope"] is not None:
            raise Skip("flashinfer: no MRoPE in apply_rope_with_cos_sin_cache_inplace")
        q, k = d["q"], d["k"]
        q2, k2 = q.view(q.shape[0], -1), k.view(k.shape[0], -1)
        return lambda: (fn(d["positions"], q2, k2, HEAD_DIM, d["cache"], is_neox=neox), q, k)[1:]

    return [
        Impl(COMPILE, "peer", _lazy(compile_prep),
             note="torch.compile of the vLLM forward_native-style gather + HF formula (out of place)"),
        Impl("flashinfer", "peer", flashinfer_prep, mutates=True, note="in place"),
    ]


def _grad_peers(op: str, layout: str) -> list[Impl]:
    neox = layout == "neox"

    def compile_prep():
        return autograd_prepare(op, _compiled(lambda x, c, s: hf_formula(x, c, s, neox)))

    return [Impl(COMPILE, "peer", _lazy(compile_prep), note=_COMPILE_NOTE + " (AOTAutograd backward)")]


def for_case(op: str, layout: str) -> list[Impl]:
    """The peers of one op, in the order their rows appear."""
    if op == "apply":
        return _apply_peers(layout)
    if op == "apply_qk":
        return _qk_peers(layout)
    if op == "apply_cached":
        return _cached_peers(layout)
    if op in ("forward", "backward"):
        return _grad_peers(op, layout)
    return []

