"""Weight files: safetensors written atomically, user files loaded without ever unpickling.

At the bottom of the stack (beside the image readers) because both the encoders (``models``) and
run folders (``medclf.runs``) read weight files.
"""

from __future__ import annotations

from pathlib import Path

from medclf.atomic import atomic_write
from medclf.errors import MedclfError


def save_tensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """safetensors written atomically (never half a file)."""
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                                             metadata={k: str(v) for k, v in (metadata or {}).items()}))


def load_tensors(path: Path) -> dict:
    """Load a safetensors file; anything else (a pickle, a .pt) is refused, never unpickled."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise MedclfError("weights file not found", path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise MedclfError(f"not a safetensors file ({' '.join(str(e).split())[:80]}); medclf never unpickles "
                          "checkpoints: convert it with safetensors, or pass a .pt to an option that loads it "
                          "with weights_only=True", path) from None


def load_torch_weights(path: Path) -> dict:
    """A user-supplied .pt/.pth state dict, loaded with ``weights_only=True`` (no arbitrary code)."""
    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        return load_tensors(path)
    if not path.exists():
        raise MedclfError("weights file not found", path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MedclfError(f"cannot load weights safely ({type(e).__name__}: {' '.join(str(e).split())[:100]})", path) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise MedclfError("does not hold a state dict", path)
    return sd
