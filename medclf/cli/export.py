"""``medclf export``: a run folder as one self-contained model package (MODEL.zip), or its network as ONNX."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medclf.cli._common import out


def export_cmd(
    run: Annotated[Path, typer.Argument(help="Run folder written by `medclf finetune` (or `pretrain`), or a MODEL.zip.",
                                        show_default=False)],
    out_path: Annotated[Optional[Path], typer.Option("--out", "-o", help="File to write: the package (MODEL.zip); with "
                                                     "--onnx the .onnx graph (default: RUN.onnx beside the run).")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Folder of `medclf eval --report` whose metrics.json goes "
                                                        "into the model card (default: the run's metrics.json, if any).")] = None,
    onnx: Annotated[bool, typer.Option("--onnx", help="Export the run's network as ONNX (plus OUT.json: inputs, "
                                                      "outputs, what stays in medclf); needs medclf\\[export].")] = False,
) -> None:
    """Package a run as one file (safetensors weights, config.json, a model card README.md), or its network as ONNX.

    `classify`, `eval` and `explain` take the package as --model MODEL.zip with the run folder's results;
    loading it reads safetensors and JSON only (nothing is unpickled). `--onnx` writes the network
    alone: the scoring loop (trials, voting, sampling, calibration) stays in medclf."""
    if onnx:
        if report is not None:
            raise typer.BadParameter("goes into a package's model card; it does not apply to --onnx", param_hint="--report")
        from medclf.export.onnx import export_onnx

        done = export_onnx(run, out_path)
        io = lambda ts: ", ".join(f"{t.name} {t.dtype}[{', '.join(map(str, t.shape))}]" for t in ts)  # noqa: E731
        out.print(f"{done.path}  ({done.method}: {io(done.inputs)} -> {io(done.outputs)}; onnxruntime vs torch "
                  f"max |diff| {done.max_abs_diff:.2g}; metadata in {done.sidecar.name})", highlight=False, markup=False,
                  soft_wrap=True)
        return
    if out_path is None:  # a usage error (exit 2), as when --out was a required option
        raise typer.BadParameter("names the package file to write (MODEL.zip); or pass --onnx for an ONNX graph",
                                 param_hint="--out")
    from medclf.export.package import export_run

    out.print(str(export_run(run, out_path, report=report)), highlight=False, soft_wrap=True)
