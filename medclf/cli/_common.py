"""What every command shares: error reporting, consoles, exit codes, registry choices, shared options."""

from __future__ import annotations

import contextlib
import enum
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from rich.console import Console
from rich.markup import escape

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
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise SystemExit(int(code))


def resume_auto_flag(argv: list[str]) -> list[str]:
    """``--resume auto`` -> the hidden ``--resume-auto`` flag: Typer options cannot take an optional value,
    and ``--resume`` must stay a plain flag for every script that already passes it."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--":
            return out + argv[i:]
        if argv[i] == "--resume" and i + 1 < len(argv) and argv[i + 1] == "auto":
            out.append("--resume-auto")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def hoist_debug(argv: list[str]) -> list[str]:
    """``argv`` with every ``--debug`` before a ``--`` separator moved to the front.

    ``--debug`` is the root callback's option, so Click accepts it only before the subcommand;
    moving it lets ``medclf classify ... --debug`` work for every command without each declaring it.
    After ``--`` it is an argument (a file named ``--debug``) and stays where it is."""
    end = argv.index("--") if "--" in argv else len(argv)
    head = [a for a in argv[:end] if a != "--debug"]
    if len(head) == end:
        return list(argv)
    return ["--debug", *head, *argv[end:]]


def run_app(app, argv: list[str], debug_env: str | None = None) -> int:
    """Run the Typer app; turn library errors into one line and a documented exit code.

    ``--debug`` (anywhere before ``--``, see ``hoist_debug``) or ``debug_env`` (``$MEDCLF_DEBUG``
    1/true/yes) re-raises instead: the full traceback, Python's exit status 1."""
    argv = resume_auto_flag(hoist_debug(list(argv)))
    debug = argv[:1] == ["--debug"] or (debug_env or "").lower() in ("1", "true", "yes")
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
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)  # "[export]", "scan[1].dcm"
        return int(ExitCode.ERROR)
    except Exception as e:  # anything unexpected: one line unless --debug
        if debug:
            raise
        err.print(f"[red]error:[/red] unexpected {type(e).__name__}: {escape(str(e))} (re-run with --debug for the traceback)",
                  highlight=False, soft_wrap=True)
        return int(ExitCode.ERROR)


def warn(lines: list[str]) -> None:
    """Warnings go to stderr, one line each, whatever the output format."""
    for w in lines:
        err.print(f"warning: {w}", highlight=False, soft_wrap=True)


def is_tty() -> bool:
    return sys.stderr.isatty()


@contextlib.contextmanager
def item_progress(label: str, fancy: bool, every_s: float = 5.0, unit: str = "inputs") -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback: a transient rich bar on a terminal; otherwise a plain
    ``label: done/total inputs`` line on stderr at most every ``every_s`` seconds (a long batch in a
    log shows it is alive; a short one prints nothing)."""
    if fancy:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                      console=err, transient=True) as bar:
            task = bar.add_task(label, total=None)
            yield lambda done, total: bar.update(task, completed=done, total=total)
        return
    last = [time.monotonic()]

    def plain(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s and done < total:
            last[0] = now
            err.print(f"{label}: {done}/{total} {unit}", highlight=False)

    yield plain


# Scoring options shared by classify, eval and explain. Each method's scorer takes the ones it knows
# (None = the run's default); the CLI stays method-agnostic.
Budget = Annotated[Optional[int], typer.Option(min=1, help="diffusion-classifier: (t, eps) trials per image (default: the run's).")]
Adaptive = Annotated[Optional[bool], typer.Option("--adaptive/--full", help="diffusion-classifier: adaptive budget (default) or full.")]
Decision = Annotated[Optional[str], typer.Option(help="diffusion-classifier: posterior (calibrated, default) | vote (Favero) | mean (Li).")]
Sampler = Annotated[Optional[str], typer.Option(help="didicm: cp (class-probability evolution) | cl (label chains).")]
DiffusionSteps = Annotated[Optional[int], typer.Option(min=1, help="diffmic/didicm: reverse steps (default: the run's).")]
Samples = Annotated[Optional[int], typer.Option(min=1, help="diffmic: label samples per image; didicm cl: chains.")]


def scorer_options(budget=None, adaptive=None, decision=None, sampler=None, diffusion_steps=None, samples=None,
                   counterfactual=None) -> dict:
    return {"trials": budget, "adaptive": adaptive, "decision": decision, "sampler": sampler,
            "diffusion_steps": diffusion_steps, "samples": samples, "counterfactual": counterfactual}


# ------------------------------------------------------------------------------- registry choices
class _RegistryEnumType(enum.EnumMeta):
    """An Enum class whose members are made from a registry on first use (iteration, lookup, call).

    Typer reads an option's choices only when it shows that command's help or parses its command
    line, so ``medclf --help`` and the other commands never import the registry's module (the
    methods' and models' pull in torch/timm; tests/test_cli_ingest.py checks start-up). On a Typer
    that reads choices up front this is still correct, only no longer lazy.
    """

    def _registry(cls) -> type[enum.Enum]:
        built = cls.__dict__.get("_built")
        if built is None:
            built = enum.Enum(cls.__name__, {k: k for k in cls._keys()}, type=str)
            type.__setattr__(cls, "_built", built)
        return built

    def __iter__(cls):
        return iter(cls._registry())

    def __len__(cls) -> int:
        return len(cls._registry())

    def __contains__(cls, value) -> bool:
        return any(value is m or value == m.value for m in cls._registry())

    def __getitem__(cls, name: str):
        return cls._registry()[name]

    @property
    def __members__(cls):
        return cls._registry().__members__

    def __call__(cls, value, *args, **kwargs):
        return cls._registry()(value)


def registry_enum(name: str, keys: Callable[[], Iterable[str]]) -> type[enum.Enum]:
    """A ``str`` Enum of a registry's names, for an option's type: ``--help`` lists the choices and a
    typo is Typer's usage error (exit 2) naming them. ``keys`` is called once, on first use; the
    members are ``enum.Enum(name, {k: k for k in keys()}, type=str)``'s: pass ``.value`` on."""
    bases = (str, enum.Enum)
    cls = _RegistryEnumType(name, bases, _RegistryEnumType.__prepare__(name, bases))
    type.__setattr__(cls, "_keys", staticmethod(keys))
    return cls


def _dataset_names() -> list[str]:
    from medclf.datasets import DATASETS

    return ["auto", *DATASETS]


def _classifier_names() -> list[str]:
    from medclf.methods import METHODS

    return sorted(n for n, cls in METHODS.items() if getattr(cls, "kind", "classifier") == "classifier")


def _unet_sizes() -> list[str]:
    from medclf.models.sizes import UNET_SIZES

    return list(UNET_SIZES)


def _dit_sizes() -> list[str]:
    from medclf.models.sizes import DIT_SIZES

    return list(DIT_SIZES)


#: ``--dataset`` (ingest, eval): "auto" (detect the layout) or a name in ``medclf.datasets.DATASETS``
DatasetName = registry_enum("DatasetName", _dataset_names)
#: ``finetune --method``: ``medclf.methods.METHODS`` entries of kind "classifier" (not the pretraining ones)
ClassifierMethod = registry_enum("ClassifierMethod", _classifier_names)
#: ``finetune --model-size``: the diffusion classifier's sizes (``UNET_SIZES``, which its build checks for --arch dit too)
ClassifierSize = registry_enum("ClassifierSize", _unet_sizes)
#: ``pretrain --model-size``: the DiT denoiser's sizes (``medclf.models.dit.DIT_SIZES``)
DitSize = registry_enum("DitSize", _dit_sizes)


def bad_argument_choice(enum_cls: type[enum.Enum], option: str) -> Callable[[str], str]:
    """``parser=`` for a registry option whose unknown value is a bad argument (exit 1, "unknown
    OPTION 'x'; choose from ...") rather than a bad command line (exit 2), as ``ingest`` documents
    its exit codes. ``--help`` still lists the choices (from the option's Enum type); the command
    receives the plain name (a ``str``)."""

    def parse(value) -> str:
        value = value.value if isinstance(value, enum.Enum) else value
        if value not in enum_cls:
            raise MedclfError(f"unknown {option} {value!r}; choose from {', '.join(m.value for m in enum_cls)}")
        return value

    return parse


# --------------------------------------------------------------------------- options of many commands
#: ``--send HOST:PORT`` / ``--aet AET`` (classify --dicom-sr, explain --dicom): C-STORE the DICOM objects written
#: (``medclf.export.send``; parse with ``send.parse_address``)
SendTo = Annotated[Optional[str], typer.Option("--send", metavar="HOST:PORT", help="C-STORE the DICOM objects written to this PACS / DICOM node.")]
CalledAET = Annotated[Optional[str], typer.Option("--aet", help="Called AE title of the --send peer (required with --send).")]


def send_target(send: str | None, aet: str | None, writes: bool, option: str) -> tuple[str, int, str] | None:
    """(host, port, called AE) of ``--send``/``--aet``, checked before any work; None without ``--send``.

    ``writes``: whether ``option`` (the one that writes the DICOM objects, e.g. ``--dicom-sr DIR``) was
    given; without it ``--send`` is refused (there would be nothing to send)."""
    from medclf.export.send import parse_address

    if send is None:
        if aet is not None:
            raise MedclfError("--aet is the --send peer's AE title: pass --send HOST:PORT too")
        return None
    if not writes:
        raise MedclfError(f"--send sends the DICOM objects medclf writes: pass {option} too")
    host, port = parse_address(send)
    if not aet:
        raise MedclfError("--send needs --aet AET (the called AE title of the peer)")
    return host, port, aet
ModelRun = Annotated[Optional[str], typer.Option("--model", help="Run folder or model package (MODEL.zip from `medclf export`; default: $MEDCLF_MODEL).")]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda.")]

# Training options shared by finetune and pretrain. Their defaults differ by objective (lr, warm-up,
# EMA decay), so each command writes its own default after the alias.
RunFolder = Annotated[Path, typer.Option("--out", "-o", help="Run folder to write.")]
Steps = Annotated[int, typer.Option(min=1, help="Optimiser steps in total.")]
BatchSize = Annotated[int, typer.Option(min=1, help="Images per step, per process.")]
#: pretrain normalises its representation across the batch (BatchNorm without affine): at least 2 images
PairedBatchSize = Annotated[int, typer.Option(min=2, help="Images per step, per process (at least 2: the representation is normalised across the batch).")]
LearningRate = Annotated[float, typer.Option("--lr", help="Peak learning rate.")]
WarmupSteps = Annotated[int, typer.Option(min=0, help="Linear warm-up steps, then cosine decay.")]
EmaDecay = Annotated[float, typer.Option(help="EMA decay of the saved weights (warmed up to this value).")]
CheckpointEvery = Annotated[int, typer.Option(min=1, help="Steps between resumable checkpoints.")]
Seed = Annotated[int, typer.Option(help="Random seed.")]
Amp = Annotated[str, typer.Option(help="auto | bf16 | fp16 | off (CUDA only).")]
Workers = Annotated[int, typer.Option(min=0, help="DataLoader workers.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue this run from its last checkpoint, with its recorded "
                                      "configuration (only --steps, --device, --workers may change). `--resume auto`: "
                                      "continue if there is a checkpoint, else start (elastic torchrun restarts).")]
#: ``--resume auto`` arrives as this hidden flag (``run_app`` rewrites it: Typer has no optional-value options)
ResumeAuto = Annotated[bool, typer.Option("--resume-auto", hidden=True)]


def resume_mode(resume: bool, resume_auto: bool) -> bool | str:
    return "auto" if resume_auto else resume


def given(ctx: typer.Context, values: dict, rename: dict | None = None) -> dict:
    """The options the user typed (not defaults), as {config key: value}: what ``--resume`` must not change."""
    rename = rename or {}
    # compared by name: Typer may vendor its own Click, whose ParameterSource is another class
    typed = ("COMMANDLINE", "ENVIRONMENT")
    return {rename.get(k, k): getattr(v, "value", v) for k, v in values.items()
            if v is not None and getattr(ctx.get_parameter_source(k), "name", None) in typed}
SummaryJson = Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")]


class TrackerKind(str, enum.Enum):
    """``--log`` choices (``medclf.training.tracking.TRACKERS``; listed here so --help needs no import)."""

    tensorboard = "tensorboard"
    mlflow = "mlflow"


#: finetune/pretrain ``--log``: the curve, config and checks to a tracker (rank 0); pass ``.value`` on
TrackLog = Annotated[Optional[TrackerKind], typer.Option(
    "--log", help="Track loss, lr, samples/s, the config and the final checks: tensorboard (RUN/tensorboard/) | mlflow "
                  "($MLFLOW_TRACKING_URI, else a file store in RUN/mlruns). Needs medclf\\[track] (pip install 'medclf\\[track]').")]


def train_options(*, steps: int, batch_size: int, lr: float, warmup_steps: int, ema_decay: float,
                  checkpoint_every: int, seed: int, device: str, amp: str, workers: int) -> dict:
    """The shared training options as ``TrainConfig`` keyword arguments (``TrainConfig(**train_options(...))``)."""
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "warmup_steps": warmup_steps, "ema_decay": ema_decay,
            "checkpoint_every": checkpoint_every, "seed": seed, "device": device, "amp": amp, "num_workers": workers}


@contextlib.contextmanager
def train_progress(label: str, steps: int, show: bool, log_every: int) -> Iterator[Callable[[dict], None]]:
    """The training loop's ``progress`` callback: a rich bar on a terminal, else about twenty plain
    lines per run on stderr (logs, pipes); nothing when ``show`` is false (``--json``, ranks > 0).

    The loop reports every ``log_every`` steps, so one report per twentieth of the run passes."""
    if not show:
        yield lambda r: None
        return

    def line(r: dict) -> str:
        return f"loss {r['loss']:.4f}  {r['samples_per_s']:.0f} samples/s"

    if is_tty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                      TimeRemainingColumn(), console=err, transient=True) as bar:
            task = bar.add_task("train", total=steps, info="")
            yield lambda r: bar.update(task, completed=r["step"], info=line(r))
        return
    every = max(1, steps // 20)

    def plain(r: dict) -> None:
        if r["step"] % every < log_every or r["step"] == steps:
            err.print(f"step {r['step']}/{steps}  {line(r)}", highlight=False)

    yield plain


# ------------------------------------------------------------------------------ sharded inference
NumParts = Annotated[Optional[int], typer.Option(
    "--num-parts", min=1, show_default=False,
    help="Score only one of K contiguous blocks of the planned inputs, in input order (with --part-id; for "
         "schedulers without torchrun). A series is never split; a 4-D NIfTI's volumes may be. The parts' --json "
         "outputs concatenated in part order (cat part0.jsonl part1.jsonl ...) are one process's output; each --csv "
         "part starts with the header (merge: awk 'FNR==1 && NR>1 {next} 1' part*.csv). Under torchrun (WORLD_SIZE "
         "> 1) each rank takes its block the same way and rank 0 prints the merged output.")]
PartId = Annotated[Optional[int], typer.Option("--part-id", min=0, show_default=False,
                                               help="The block this process scores, 0..K-1 (with --num-parts).")]


def shard_share(num_parts: int | None, part_id: int | None):
    """This process's ``medclf.sharding.Share`` (joining torchrun's group when started by it); a
    usage error (exit 2) when only one of --num-parts/--part-id is given or the id is out of range."""
    from medclf.sharding import process_share

    if (num_parts is None) != (part_id is None):
        raise typer.BadParameter("goes with --part-id / --num-parts: pass both (e.g. --num-parts 4 --part-id 0)",
                                 param_hint="--num-parts" if part_id is None else "--part-id")
    if num_parts is not None and part_id >= num_parts:
        raise typer.BadParameter(f"{part_id} is not a part of --num-parts {num_parts} (0..{num_parts - 1})",
                                 param_hint="--part-id")
    return process_share(num_parts, part_id)


class HeldOutput:
    """Under torchrun, what this rank prints (stdout and stderr) is held from here until ``release``,
    where rank 0 prints every rank's in rank order: the ranks' blocks are contiguous in input order,
    so per-input lines (--json, errors, warnings) read as one process's. Elsewhere a no-op.

    A rank that stops on an error (``release`` never reached) still prints what it held, then its
    error line, at exit; torchrun then ends its peers."""

    def __init__(self, share) -> None:
        self.share = share
        self.active = share is not None and share.distributed
        self.released = False
        if self.active:
            import atexit
            import io

            self._streams = (sys.stdout, sys.stderr)
            self.held = (io.StringIO(), io.StringIO())
            sys.stdout, sys.stderr = self.held
            atexit.register(self._at_exit)

    def _restore(self) -> tuple[str, str]:
        sys.stdout, sys.stderr = self._streams
        return self.held[0].getvalue(), self.held[1].getvalue()

    def _at_exit(self) -> None:
        if self.active and not self.released:
            self.released = True
            text_out, text_err = self._restore()
            sys.stdout.write(text_out)
            sys.stderr.write(text_err)
            sys.stdout.flush()
            sys.stderr.flush()

    def release(self, csv_header: bool = False) -> None:
        """Rank 0 prints every rank's held output (the others print nothing). ``csv_header``: each
        rank's CSV starts with the header; only the first one printed is kept, as parts merge."""
        if not self.active or self.released:
            return
        self.released = True
        mine = self._restore()
        header_seen = False
        for text_out, text_err in self.share.merged([mine]):
            if csv_header and text_out:
                if header_seen:
                    text_out = text_out.split("\n", 1)[1] if "\n" in text_out else ""
                header_seen = True
            sys.stdout.write(text_out)
            sys.stderr.write(text_err)
        sys.stdout.flush()
        sys.stderr.flush()
