"""What every command shares: error reporting, consoles, exit codes."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Annotated, Optional

import click
import typer
from rich.console import Console

from medclf.errors import ExitCode, MedclfError

# Typer >= 0.2x vendors Click as ``typer._click``: the exceptions it raises are not click's own, so
# catch both (else a bad option reads "unexpected BadParameter" with exit code 1 instead of 2).
_EXIT = (click.exceptions.Exit, typer.Exit)
_ABORT = (click.exceptions.Abort, typer.Abort)
_USAGE = (click.ClickException, *((typer.TyperException,) if hasattr(typer, "TyperException") else ()))

out = Console()  # results (tables, JSON) go to stdout
err = Console(stderr=True)  # progress, warnings and errors go to stderr


@dataclass
class _State:
    debug: bool = False


state = _State()


def fail(message: str, code: int = ExitCode.ERROR) -> "NoReturn":  # noqa: F821
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise SystemExit(int(code))


def run_app(app, argv: list[str], debug_env: str | None = None) -> int:
    """Run the Typer app; turn library errors into one line and a documented exit code."""
    debug = "--debug" in argv or (debug_env or "").lower() in ("1", "true", "yes")
    try:
        rc = app(args=argv, prog_name="medclf", standalone_mode=False)
        if rc == 130:  # Typer turns Ctrl-C into exit code 130 itself: no KeyboardInterrupt reaches the handler below
            err.print("interrupted: re-run with --resume to continue where it stopped")
        return rc if isinstance(rc, int) else 0
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    except _EXIT as e:
        return int(e.exit_code)
    except _USAGE as e:
        e.show()
        return int(ExitCode.USAGE)
    except _ABORT:
        err.print("aborted")
        return 130
    except KeyboardInterrupt:
        err.print("interrupted: re-run with --resume to continue where it stopped")
        return 130
    except MedclfError as e:
        if debug:
            raise
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        return int(ExitCode.ERROR)
    except Exception as e:  # anything unexpected: one line unless --debug
        if debug:
            raise
        err.print(f"[red]error:[/red] unexpected {type(e).__name__}: {e} (re-run with --debug for the traceback)",
                  highlight=False, soft_wrap=True)
        return int(ExitCode.ERROR)


def is_tty() -> bool:
    return sys.stderr.isatty()


# Scoring options shared by classify, eval and explain. Each method's scorer takes the ones it knows
# (None = the run's default); the CLI stays method-agnostic.
Budget = Annotated[Optional[int], typer.Option(min=1, help="diffusion-classifier: (t, eps) trials per image (default: the run's).")]
Adaptive = Annotated[Optional[bool], typer.Option("--adaptive/--full", help="diffusion-classifier: adaptive budget (default) or full.")]
Decision = Annotated[Optional[str], typer.Option(help="diffusion-classifier: posterior (calibrated, default) | vote (Favero) | mean (Li).")]
Sampler = Annotated[Optional[str], typer.Option(help="didicm: cp (class-probability evolution) | cl (label chains).")]
DiffusionSteps = Annotated[Optional[int], typer.Option(min=1, help="diffmic/didicm: reverse steps (default: the run's).")]
Samples = Annotated[Optional[int], typer.Option(min=1, help="diffmic: label samples per image; didicm cl: chains.")]


def scorer_options(budget=None, adaptive=None, decision=None, sampler=None, diffusion_steps=None, samples=None) -> dict:
    return {"trials": budget, "adaptive": adaptive, "decision": decision, "sampler": sampler,
            "diffusion_steps": diffusion_steps, "samples": samples}
