"""``medclf`` as torchrun runs it, with one injected failure (for tests/test_elastic.py).

Run as ``torchrun ... tests/_elastic_worker.py finetune CACHE --out RUN ...``. Every attempt appends
"RANK RESTART_COUNT" to ``$ELASTIC_ATTEMPTS``. With ``$ELASTIC_KILL_MARKER`` set, rank 1 dies
(``os._exit(1)``, no cleanup, as a killed process would) right after the first checkpoint is
complete -- only while the marker file does not exist, and it creates the marker first, so the
restarted attempt runs through. The library carries no test hooks: this wraps its checkpoint step.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import medclf.training.loop as loop
from medclf.cli import main


def _record_attempt() -> None:
    log = os.environ.get("ELASTIC_ATTEMPTS")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{os.environ.get('RANK', '0')} {os.environ.get('TORCHELASTIC_RESTART_COUNT', '-')}\n")


def _die_after_first_checkpoint() -> None:
    marker = os.environ.get("ELASTIC_KILL_MARKER")
    if not marker or os.environ.get("RANK") != "1":
        return
    checkpoint = loop._checkpoint

    def checkpoint_then_die(*args, **kwargs) -> None:
        checkpoint(*args, **kwargs)  # returns after the barrier: the checkpoint is complete on disk
        if not Path(marker).exists():
            Path(marker).write_text(f"rank 1 killed after the checkpoint of step {args[1]}\n")
            os._exit(1)

    loop._checkpoint = checkpoint_then_die


if __name__ == "__main__":
    _record_attempt()
    _die_after_first_checkpoint()
    sys.argv[0] = "medclf"
    main()
