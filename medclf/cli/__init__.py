"""The ``medclf`` command line: parse, call the library, print. Heavy imports happen inside commands."""

from __future__ import annotations

import os
import sys

import typer

from medclf import __version__
from medclf.cli import classify as _classify
from medclf.cli import evaluate as _evaluate
from medclf.cli import explain as _explain
from medclf.cli import export as _export
from medclf.cli import finetune as _finetune
from medclf.cli import ingest as _ingest
from medclf.cli import pretrain as _pretrain
from medclf.cli import sample as _sample
from medclf.cli._common import state

app = typer.Typer(
    name="medclf",
    help="Classify medical images (DICOM, NIfTI, PNG, JPEG) with diffusion models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"medclf {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.", envvar="MEDCLF_DEBUG"),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    state.debug = debug


app.command("ingest", no_args_is_help=True)(_ingest.ingest_cmd)
app.command("finetune", no_args_is_help=True)(_finetune.finetune_cmd)
app.command("classify", no_args_is_help=True)(_classify.classify_cmd)
app.command("eval")(_evaluate.eval_cmd)
app.command("explain", no_args_is_help=True)(_explain.explain_cmd)
app.command("export", no_args_is_help=True)(_export.export_cmd)
app.command("pretrain", no_args_is_help=True)(_pretrain.pretrain_cmd)
app.command("sample", no_args_is_help=True)(_sample.sample_cmd)


def main() -> None:
    """Console-script entry point: library errors become one line on stderr and an exit code."""
    from medclf.cli._common import run_app

    sys.exit(run_app(app, sys.argv[1:], debug_env=os.environ.get("MEDCLF_DEBUG")))
