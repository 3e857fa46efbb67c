"""Sharded inference: which block of the planned inputs (or of an eval split) this process scores,
and, under torchrun, every rank's results merged on rank 0.

A share is a contiguous block in input order: part ``--part-id`` of ``--num-parts``, then rank
``RANK`` of ``WORLD_SIZE`` within that part. Contiguous blocks make merging exact and trivial: the
parts' outputs concatenated in part order are a single process's output (``cat part*.jsonl``), and
rank 0 merges the ranks' results by concatenating them in rank order; no ids, sorting or dedup.
"""

from __future__ import annotations

import atexit
import datetime
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from medclf.errors import MedclfError

T = TypeVar("T")

#: Ranks wait at the merge for the slowest one (a rank may hold hours more work than another);
#: torchrun ends the whole group when a rank dies, so this only bounds a rank that hangs.
MERGE_TIMEOUT = datetime.timedelta(days=7)


def block(n: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of block ``index`` of ``parts`` contiguous blocks of ``n`` items, in order.

    Sizes differ by at most one (the larger blocks spread out, ``index * n // parts``), any part
    may be empty when ``n < parts``, and the blocks tile ``[0, n)``: the same numbers give the same
    partition on every machine."""
    if parts < 1 or not 0 <= index < parts:
        raise MedclfError(f"part {index} of {parts}: the part id must be in 0..{parts - 1}")
    return index * n // parts, (index + 1) * n // parts


@dataclass(frozen=True)
class Share:
    """This process's share of the work: part ``part`` of ``parts`` (``--num-parts``), and within
    it rank ``rank`` of ``world`` (torchrun). ``Share()`` is the whole of it (one process)."""

    part: int = 0
    parts: int = 1
    rank: int = 0
    world: int = 1

    @property
    def whole(self) -> bool:
        """One process scores everything: nothing to select or merge."""
        return self.parts == 1 and self.world == 1

    @property
    def distributed(self) -> bool:
        """Started by torchrun with more than one process: results are merged on rank 0."""
        return self.world > 1

    @property
    def root(self) -> bool:
        """The process that prints (rank 0); every process of a ``--num-parts`` run is its part's root."""
        return self.rank == 0

    def bounds(self, n: int, unit: int = 1) -> tuple[int, int]:
        """``[start, stop)`` of this share among ``n`` items, cut only at multiples of ``unit``.

        ``unit`` > 1 keeps batches whole (``eval``: each rank scores exactly the batches a single
        process would, so batch-dependent arithmetic and per-batch noise are the same)."""
        units = -(-n // unit)
        lo, hi = block(units, self.parts, self.part)
        a, b = block(hi - lo, self.world, self.rank)
        return min((lo + a) * unit, n), min((lo + b) * unit, n)

    def from_root(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on rank 0 only, its value on every rank (under torchrun; else just ``fn()``).

        For what must happen once: reading ``-`` (stdin reaches rank 0 only, and two readers would
        split its lines), ingesting a raw dataset into the shared cache folder. A ``MedclfError``
        ``fn`` raises is raised on every rank, so all of them stop with the same message."""
        if not self.distributed:
            return fn()
        import torch.distributed as dist

        box: list = [None]
        if self.root:
            try:
                box[0] = ("ok", fn())
            except MedclfError as e:
                box[0] = ("error", e.message, e.path)
        dist.broadcast_object_list(box, src=0)
        if box[0][0] == "error":
            raise MedclfError(box[0][1], box[0][2])
        return box[0][1]

    def merged(self, records: Iterable[T]) -> Iterator[T]:
        """The records to print: this process's as they come (one process, or one ``--num-parts``
        part: streaming); under torchrun, on rank 0, every rank's records in rank order once all
        ranks are done (``gather_object`` over gloo), and nothing on the other ranks.

        Records must be small and picklable (rows, messages): never images or tensors."""
        if not self.distributed:
            yield from records
            return
        import torch.distributed as dist

        mine = list(records)
        got: list | None = [None] * self.world if self.root else None
        dist.gather_object(mine, got, dst=0)
        if got is not None:
            for part in got:
                yield from part

    def failures(self, n: int) -> int:
        """The whole batch's failed inputs (``n`` of each rank, summed) on rank 0, and 0 on the others
        (under torchrun; else ``n``). Rank 0, which prints every rank's output, exits with the batch's
        status and the others exit 0: torchrun ends every worker as soon as one fails, which would cut
        rank 0 off while it still prints."""
        if not self.distributed:
            return n
        import torch.distributed as dist

        got: list | None = [None] * self.world if self.root else None
        dist.gather_object(int(n), got, dst=0)
        return sum(got) if got is not None else 0

    def close(self) -> None:
        """Leave the process group (torchrun) once the last exchange is done, so that gloo's threads
        end here and not during interpreter exit, where one releasing a tensor aborts the rank
        (SIGABRT, "terminate called without an active exception"; see ``_join_group``)."""
        if self.distributed:
            _close_group()


def process_share(num_parts: int | None = None, part_id: int | None = None) -> Share:
    """The share of this process: ``--num-parts K --part-id I`` (I in 0..K-1; both or neither), then
    torchrun's ``RANK`` of ``WORLD_SIZE`` within it. Under torchrun this joins the process group
    (gloo: only small Python objects are exchanged, whatever device scores)."""
    from medclf.training.loop import distributed_env

    if (num_parts is None) != (part_id is None):
        raise MedclfError("--num-parts and --part-id go together (e.g. --num-parts 4 --part-id 0)")
    parts, part = (num_parts, part_id) if num_parts is not None else (1, 0)
    block(0, parts, part)  # checks the range
    rank, world, _ = distributed_env()
    if world > 1:
        _join_group()
    return Share(part=part, parts=parts, rank=rank, world=world)


def _join_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    # torch._dynamo (which timm and MONAI import) keeps a reference to a process group that exists
    # when it is first imported, so destroy_process_group would leave gloo's threads running; one of
    # them then released a tensor during interpreter exit and aborted the rank (SIGABRT). Imported
    # first, it holds nothing and leaving the group really ends them.
    import torch._dynamo  # noqa: F401

    try:
        dist.init_process_group(backend="gloo", timeout=MERGE_TIMEOUT)
    except (ValueError, RuntimeError) as e:  # WORLD_SIZE set by hand, without torchrun's rendezvous
        raise MedclfError(f"WORLD_SIZE > 1 but the process group cannot start ({' '.join(str(e).split())[:160]}); "
                          "start the command with torchrun") from None
    atexit.register(_close_group)  # a rank that stops on an error still leaves cleanly


def _close_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
