"""A sharded ingest's parts on disk: what ``ingest --num-parts K --part-id I`` writes and ``--merge`` checks.

    CACHE/parts/part-I-of-K/
      part.json            the part's record, written last and atomically (its presence = the part is complete):
                           fingerprint of the whole plan, the plan's header (what the manifest needs), the
                           part's shard indices, its item and failure counts, medclf version
      shards/NNNNN.bin     shard NNNNN of the whole plan, byte for byte what a single ingest writes there,
      shards/NNNNN.jsonl   with its item records (splits not yet assigned) and
      shards/NNNNN.errors.jsonl  its failed inputs
      .ingest/plan.json    while the part is in progress (``--resume``)

Parts are whole shards of the single-machine plan (part I: shards I, I+K, I+2K, ...), so merging is
renames plus the manifest step a single ingest ends with, never a second copy of the pixels. Parts
live inside CACHE so that they share its file system (renames, not copies) and a folder with parts
never reads as a complete cache (no manifest.json at its top).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from medclf.data.cache import FORMAT_VERSION, PARTS, SHARDS
from medclf.errors import MedclfError

PART_RECORD = "part.json"
KIND = "medclf-ingest-part"
_NAME = re.compile(r"^part-(\d+)-of-(\d+)$")
#: a shard's files, in the order a merge moves them: the .bin last (its presence marks the shard done)
SHARD_SUFFIXES = (".jsonl", ".errors.jsonl", ".bin")


def part_name(part_id: int, num_parts: int) -> str:
    return f"part-{part_id}-of-{num_parts}"


def part_dir(out: Path, part_id: int, num_parts: int) -> Path:
    return Path(out) / PARTS / part_name(part_id, num_parts)


def part_shards(n_shards: int, part_id: int, num_parts: int) -> list[int]:
    """The whole plan's shards that part ``part_id`` processes: round robin, so a slow stretch of the
    plan (a folder of large volumes) is spread over the parts rather than landing on one."""
    return list(range(part_id, n_shards, num_parts))


def check_part_args(num_parts: int | None, part_id: int | None) -> None:
    if (num_parts is None) != (part_id is None):
        raise MedclfError("--num-parts and --part-id go together (part I of K: --num-parts K --part-id I)")
    if num_parts is not None and not (num_parts >= 1 and 0 <= part_id < num_parts):
        raise MedclfError(f"--part-id {part_id} is outside 0..{num_parts - 1} (--num-parts {num_parts})")


def shard_file(folder: Path, k: int, suffix: str) -> Path:
    return Path(folder) / SHARDS / f"{k:05d}{suffix}"


@dataclass
class Part:
    """A complete part, as ``find_parts`` read and checked it."""

    folder: Path
    record: dict

    @property
    def label(self) -> str:
        return f"part {self.record['part_id']} of {self.record['num_parts']}"


def read_record(folder: Path) -> dict | None:
    """The part's record; None while it is unfinished (no part.json yet)."""
    p = Path(folder) / PART_RECORD
    if not p.exists():
        return None
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise MedclfError(f"unreadable part record ({' '.join(str(e).split())})", p) from None
    if not isinstance(rec, dict) or rec.get("kind") != KIND:
        raise MedclfError("not a medclf ingest part record", p)
    return rec


def _same_plan(a: dict, b: dict) -> str | None:
    """What differs between two parts' records that would make their shards belong to different caches."""
    for key, what in (("format", "cache format"), ("medclf_version", "medclf version")):
        if a.get(key) != b.get(key):
            return f"{what} {b.get(key)} vs {a.get(key)}"
    ha, hb = a.get("header") or {}, b.get("header") or {}
    diff = sorted(k for k in set(ha) | set(hb) if ha.get(k) != hb.get(k))
    if diff:  # options (dataset, seed, preprocessing) or what the plan made of the inputs (classes, notes)
        return "differs in " + ", ".join(diff)
    for key, what in (("fingerprint", "input files' fingerprint"), ("n_units", "planned inputs"), ("n_shards", "shards")):
        if a.get(key) != b.get(key):  # same options, other files (paths, sizes, modification times)
            return f"{what} {b.get(key)} vs {a.get(key)}"
    return None


def find_parts(out: Path) -> list[Part]:
    """All K parts of ``out``, complete and planned alike; else one error naming the first missing,
    unfinished or mismatched part. Reads only: a refused merge changes nothing."""
    out = Path(out)
    root = out / PARTS
    if not root.is_dir():
        raise MedclfError(f"no parts to merge (no {PARTS}/ folder): write them first with medclf ingest SOURCE... "
                          "--out CACHE --num-parts K --part-id I", out)
    found: dict[int, set[int]] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        m = _NAME.match(entry.name)
        if m is None or not entry.is_dir():
            raise MedclfError("is not a part folder (part-I-of-K); remove it or move it out of the way", entry)
        i, k = int(m.group(1)), int(m.group(2))
        if not 0 <= i < k:
            raise MedclfError(f"part {i} of {k} cannot exist (part ids run 0..K-1)", entry)
        found.setdefault(k, set()).add(i)
    if not found:
        raise MedclfError("no parts to merge: the parts/ folder is empty", root)
    if len(found) > 1:
        ks = sorted(found)
        odd = min(ks, key=lambda k: (len(found[k]), k))  # the count with the fewest parts is the stray one
        raise MedclfError(f"holds parts of different --num-parts ({', '.join(map(str, ks))}): remove the parts "
                          f"of the run you do not want (e.g. {part_name(min(found[odd]), odd)})", root)
    (k,) = found
    parts = []
    for i in range(k):
        folder = part_dir(out, i, k)
        if i not in found[k]:
            raise MedclfError(f"part {i} of {k} is missing: run medclf ingest SOURCE... --out {out} "
                              f"--num-parts {k} --part-id {i} with the other parts' options", folder)
        rec = read_record(folder)
        if rec is None:
            raise MedclfError(f"part {i} of {k} is not finished: re-run its medclf ingest with --resume", folder)
        if (rec.get("part_id"), rec.get("num_parts")) != (i, k):
            raise MedclfError(f"records part {rec.get('part_id')} of {rec.get('num_parts')}, not part {i} of {k}", folder)
        parts.append(Part(folder, rec))
    ref = parts[0].record
    if ref.get("format") != FORMAT_VERSION:
        raise MedclfError(f"{parts[0].label} has cache format {ref.get('format')} (medclf {ref.get('medclf_version')}); "
                          f"this medclf merges format {FORMAT_VERSION}: re-ingest the parts with it", parts[0].folder)
    for p in parts[1:]:
        diff = _same_plan(ref, p.record)
        if diff is not None:
            raise MedclfError(f"{p.label} was planned from other inputs or options than part 0 ({diff}): "
                              f"re-run it with part 0's arguments (and --overwrite)", p.folder)
    for p in parts:
        want = part_shards(ref["n_shards"], p.record["part_id"], k)
        if p.record.get("shards") != want:
            raise MedclfError(f"{p.label} holds shards {p.record.get('shards')}, not {want}", p.folder)
    return parts


def check_shard_files(parts: list[Part], out: Path, moved_ok: bool) -> None:
    """Every shard file of every part is in the part, or (``moved_ok``: continuing an interrupted merge of
    these parts) in ``out/shards`` already; else one error naming the part and the file."""
    for p in parts:
        for s in p.record["shards"]:
            for suffix in SHARD_SUFFIXES:
                if not (shard_file(p.folder, s, suffix).exists() or (moved_ok and shard_file(out, s, suffix).exists())):
                    raise MedclfError(f"{p.label} lacks {SHARDS}/{s:05d}{suffix}: re-run it with --overwrite", p.folder)


def move_shards(part: Part, out: Path) -> None:
    """Rename the part's shard files into ``out/shards`` (an interrupted merge's moves are skipped); the
    .bin goes last, so a shard whose .bin is in ``out`` has all its files there."""
    (Path(out) / SHARDS).mkdir(parents=True, exist_ok=True)
    for s in part.record["shards"]:
        for suffix in SHARD_SUFFIXES:
            src = shard_file(part.folder, s, suffix)
            if src.exists():
                os.replace(src, shard_file(out, s, suffix))


def record(part_id: int, num_parts: int, fp: str, n_units: int, n_shards: int, header: dict, n_units_part: int,
           n_items: int, n_failed: int, version: str) -> dict:
    """The part.json contents: everything ``--merge`` compares across parts or puts in the manifest
    (``n_units``, ``n_shards``: the whole plan's; ``n_units_part``, ``n_items``, ``n_failed``: this part's)."""
    return {"kind": KIND, "format": FORMAT_VERSION, "medclf_version": version, "part_id": part_id,
            "num_parts": num_parts, "fingerprint": fp, "n_units": n_units, "n_shards": n_shards,
            "shards": part_shards(n_shards, part_id, num_parts), "header": header, "n_units_part": n_units_part,
            "n_items": n_items, "n_failed": n_failed}
