"""BitNet b1.58 (ternary) language models, run by bitnet-engine's exact kernels.

    >>> import bitnet
    >>> model = bitnet.Model()            # the small model embedded in the package
    >>> model.generate("The capital of France is", max_tokens=16, seed=1)
    >>> for piece in model.generate("Once upon a time", stream=True):
    ...     print(piece, end="", flush=True)

Logits are numpy float32 arrays, identical to `bitnet logits`; a seeded generate() gives the text `bitnet run`
gives with the same seed and settings. Errors of the engine raise bitnet.BitnetError with its message.
"""

import os as _os

# As the `bitnet` binary does (native/src/device.rs): with no display, Mesa's Vulkan device-select layer has
# nothing to select by and prints "error: XDG_RUNTIME_DIR is invalid..." whenever backend="auto" or "wgpu"
# lists the GPUs; its documented switch turns it off. Set before the extension can start Vulkan.
if not _os.environ.get("DISPLAY") and not _os.environ.get("WAYLAND_DISPLAY"):
    _os.environ.setdefault("NODEVICE_SELECT", "1")

from ._bitnet import BitnetError, Model, TextStream

__all__ = ["BitnetError", "Model", "TextStream"]
