"""Drop-in use of rope_backends from models you already run: one call patches a model.

    from rope_backends.integrations.transformers import patch     # Llama, Qwen, Gemma, GPT-J, Qwen-VL, ...
    from rope_backends.integrations.diffusers import patch        # Wan, Helios, Flux, HunyuanVideo, ...

    with patch(model):            # or: handle = patch(model); ...; handle.undo()
        ...

Each ``patch(model)`` changes that model instance only (never the library's modules, never another
model) and returns a :class:`Patch` handle. What is supported, how it works and what is proven:
``docs/integrations.md``.

Importing this package or its submodules imports neither transformers nor diffusers (the model
you pass has done that), and ``import rope_backends`` does not import this package.
"""

from __future__ import annotations

from ._patching import Patch

__all__ = ["Patch"]
