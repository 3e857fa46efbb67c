"""``medclf export``: a run folder as one self-contained model package (MODEL.zip)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medclf.cli._common import out


def export_cmd(
    run: Annotated[Path, typer.Argument(help="Run folder written by `medclf finetune` (or `pretrain`).", show_default=False)],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Package file to write (MODEL.zip).")],
    report: Annotated[Optional[Path], typer.Option(help="Folder of `medclf eval --report` whose metrics.json goes "
                                                        "into the model card (default: the run's metrics.json, if any).")] = None,
) -> None:
    """Package a run as one file (safetensors weights, config.json, a model card README.md).

    `classify`, `eval` and `explain` take it as --model MODEL.zip with the run folder's results;
    loading it reads safetensors and JSON only (nothing is unpickled)."""
    from medclf.export.package import export_run

    out.print(str(export_run(run, out_path, report=report)), highlight=False, soft_wrap=True)
