"""Drop-in rope_backends for a diffusers video transformer: one ``patch`` call, the same denoising loop.

    python examples/patch_diffusers.py        # CPU in seconds; on a GPU machine it runs on "cuda"

``rope_backends.integrations.diffusers.patch(transformer)`` routes every attention processor's
rotary call (Wan's 3-D RoPE here) through ``rb.apply`` -- one fused launch per q or k on a GPU --
for this model instance only, and ``undo`` (or leaving the ``with``) gives the original processors
back. A tiny randomly initialised ``WanTransformer3DModel`` (nothing downloaded) runs a few
flow-matching steps of ``FlowMatchEulerDiscreteScheduler``, as ``WanPipeline``'s loop does, with and
without the patch: in float32, and in bf16 loaded the way ``from_pretrained(torch_dtype=bf16)``
loads it (the rope tables stay float32), the final latents are bit-identical.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

from rope_backends.integrations.diffusers import patch


def tiny_wan(dtype: torch.dtype, device: str) -> WanTransformer3DModel:
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=4,
                                  out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
                                  rope_max_seq_len=64)
    keep = set(model._keep_in_fp32_modules or ())  # what from_pretrained(torch_dtype=...) keeps in float32
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not keep & set(name.split(".")):
            t.data = t.data.to(dtype)
    return model.to(device).eval()


@torch.no_grad()
def denoise(model, latents, text, steps: int) -> torch.Tensor:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps, device=latents.device)
    for t in scheduler.timesteps:
        noise_pred = model(latents, t.expand(latents.shape[0]), text, return_dict=False)[0]
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    return latents


def main(device: str | None = None, steps: int = 3, verbose: bool = True) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    result = dict(device=device)
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_wan(dtype, device)
        latents = torch.randn(1, 4, 3, 8, 8, generator=g).to(device, dtype)  # [B, C, F, H, W]
        text = torch.randn(1, 8, 32, generator=g).to(device, dtype)
        want = denoise(model, latents, text, steps)
        with patch(model) as handle:
            got = denoise(model, latents, text, steps)
        name = str(dtype).replace("torch.", "")
        result[f"patched_modules_{name}"] = len(handle.modules)
        result[f"bit_exact_latents_{name}"] = bool(torch.equal(got, want))
    if verbose:
        print(result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    main(args.device, args.steps)
