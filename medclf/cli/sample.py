"""``medclf sample``: images drawn from a pretraining run, conditioned on one scan's representation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medclf.cli._common import Device, Seed, out


def sample_cmd(
    like: Annotated[Path, typer.Option("--like", help="Scan whose representation conditions the samples (DICOM, NIfTI, PNG, ...).")],
    model: Annotated[Optional[str], typer.Option(help="Run folder written by `medclf pretrain` (default: $MEDCLF_MODEL).")] = None,
    n: Annotated[int, typer.Option("--n", min=1, max=64, help="Samples to draw.")] = 4,
    out_path: Annotated[Path, typer.Option("--out", "-o", help="PNG grid to write (input first, then the samples).")] = Path("samples.png"),
    steps: Annotated[int, typer.Option(min=1, help="DDIM steps.")] = 50,
    guidance: Annotated[float, typer.Option(min=0.0, help="Classifier-free guidance on r (1 = none).")] = 1.0,
    slice_index: Annotated[Optional[int], typer.Option("--slice", help="Slice of a volume (default: the middle one).")] = None,
    seed: Seed = 0,
    device: Device = "auto",
) -> None:
    """Draw images conditioned on a scan's representation: what the pretrained encoder keeps of it."""
    import torch

    from medclf.figures import save_sample_grid
    from medclf.inference import load_input, prepare
    from medclf.preprocessing import PreprocessConfig
    from medclf.runs import load_pretraining, resolve_model
    from medclf.training.loop import resolve_device

    dev = resolve_device(device)
    run, method, net = load_pretraining(resolve_model(model), dev)
    pre = PreprocessConfig.from_dict(run.config["preprocessing"])
    x = prepare(load_input(like), pre, str(like))  # (S, C, H, W) in [0, 1]
    s = len(x) // 2 if slice_index is None else slice_index
    if not 0 <= s < len(x):
        from medclf.errors import MedclfError

        raise MedclfError(f"--slice {s} is outside 0..{len(x) - 1}", like)
    image = torch.from_numpy(x[s]).float()
    samples = method.sample(net, image, n, steps=steps, guidance=guidance, seed=seed, device=dev)
    save_sample_grid(out_path, image, samples, title=f"{like.name}: {n} samples from {run.path.name}")
    out.print(f"samples written: {out_path}", highlight=False, soft_wrap=True)
