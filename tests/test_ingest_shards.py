"""A sharded ingest (issue #15): ``--num-parts K --part-id I`` parts merged by ``--merge`` give a single
ingest's cache byte for byte (manifest, items, errors, shards; tensors torch.equal), split by patient over
the whole plan; the merge refuses missing, unfinished and mismatched parts; parts and merges resume."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_bad_dicom, write_ct
from PIL import Image

from medclf.cli import app
from medclf.cli._common import run_app
from medclf.data import CacheDataset, open_cache
from medclf.datasets.splits import group_split
from medclf.errors import MedclfError

ARGS = ["--size", "16", "--workers", "1"]
K = 3


def mixed_tree(root: Path) -> Path:
    """Two class folders of ~135 inputs (three shards of the whole plan: 64, 64, 7): single DICOM
    slices of 30 patients, three slices each, named so that a patient's slices sit in different shards
    (and so parts); a DICOM series; grey PNGs; and a failure in every shard (a truncated DICOM, one
    without pixels, a broken JPEG) plus one found while planning (a text file named .dcm)."""
    rng = np.random.default_rng(0)
    for c, cls in enumerate("ab"):
        for j in range(3):
            for p in range(15 * c, 15 * c + 15):
                write_ct(root / cls / f"{j}_{p:02d}.dcm", rng.integers(900, 1200, (24, 24)), patient=p)
        for k in range(20):
            Image.fromarray(rng.integers(0, 255, (20, 20)).astype(np.uint8)).save(root / cls / f"img_{k:02d}.png")
    for z in range(3):
        write_ct(root / "a" / "series" / f"s{z}.dcm", rng.integers(900, 1200, (24, 24)), ipp=(0, 0, 5.0 * z),
                 series_uid="1.2.826.0.1.3680043.8.498.91", patient=40)
    write_bad_dicom(root / "a" / "bad_truncated.dcm", "truncated")  # shard 0
    write_bad_dicom(root / "a" / "notes.dcm", "text")  # a planning failure (no DICM preamble)
    write_bad_dicom(root / "b" / "bad_nopixels.dcm", "nopixels")  # shard 1
    (root / "b" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff garbage")  # the last input: shard 2
    return root


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = run_app(app, [str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_part(capsys, src: Path, out: Path, i: int, k: int = K, *extra) -> dict:
    rc, stdout, err = cli(capsys, "ingest", src, "--out", out, *ARGS, "--num-parts", k, "--part-id", i, "--json", *extra)
    assert rc in (0, 3), err
    return json.loads(stdout)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The tree ingested once whole (2 worker processes) and once as K=3 parts (1 each) + merge, via the CLI;
    a copy of the parts as they were before the merge (which moves their shards) for the refusal tests."""
    tmp = tmp_path_factory.mktemp("shards")
    src = mixed_tree(tmp / "src")
    def quiet(*argv):  # no capsys at module scope: capture by hand
        o, e = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
            rc = run_app(app, [str(a) for a in argv])
        return rc, o.getvalue(), e.getvalue()

    rc, ref_out, err = quiet("ingest", src, "--out", tmp / "ref", "--size", "16", "--workers", "2", "--json")
    assert rc == 3, err
    out = tmp / "cache"
    parts = []
    for i in range(K):
        rc, o, err = quiet("ingest", src, "--out", out, *ARGS, "--num-parts", K, "--part-id", i, "--json")
        assert rc == 3, err  # every part has a failed input
        parts.append(json.loads(o))
    assert not (out / "manifest.json").exists()
    with pytest.raises(MedclfError, match="parts of a sharded ingest: run medclf ingest --merge"):
        open_cache(out)
    shutil.copytree(out / "parts", tmp / "parts_before_merge")
    records = [json.loads((out / "parts" / f"part-{i}-of-{K}" / "part.json").read_text()) for i in range(K)]
    rc, merged_out, err = quiet("ingest", "--merge", "--out", out, "--json")
    assert rc == 3, err  # the parts' failures are the cache's
    return {"src": src, "ref": tmp / "ref", "out": out, "ref_summary": json.loads(ref_out), "parts": parts,
            "records": records, "merged": json.loads(merged_out), "merge_err": err, "parts_copy": tmp / "parts_before_merge"}


def fresh_parts(sharded, dst: Path) -> Path:
    """A cache folder holding a copy of the K parts, not merged yet."""
    shutil.copytree(sharded["parts_copy"], dst / "parts")
    return dst


# --------------------------------------------------------------------------------- equal to one ingest
def test_merged_parts_equal_a_single_ingest(sharded):
    ref, out = sharded["ref"], sharded["out"]
    # byte-identical: manifest (fingerprint, counts, shards list, ...), items, errors, every shard file
    assert files(out) == files(ref)
    assert sorted(files(out)) == ["errors.jsonl", "items.jsonl", "manifest.json", "shards/00000.bin", "shards/00001.bin",
                                  "shards/00002.bin"]  # the parts and the merge state are gone; no temp files
    a, b = open_cache(ref), open_cache(out)
    assert a.fingerprint == b.fingerprint == sharded["merged"]["fingerprint"] == sharded["ref_summary"]["fingerprint"]
    assert {p["fingerprint"] for p in sharded["parts"]} == {a.fingerprint}  # each part fingerprints the whole plan
    assert b.manifest["n_items"] == 93 + 40 and b.manifest["n_units"] == sum(p["n_units"] for p in sharded["parts"])
    da, db = CacheDataset(ref), CacheDataset(out)
    assert len(da) == len(db) == 133
    for i in range(len(da)):
        x, y = da[i], db[i]
        assert x["id"] == y["id"] and torch.equal(x["image"], y["image"]) and x["label"] == y["label"]
    assert len({da[i]["image"].numpy().tobytes() for i in range(len(da))}) == 133  # not all the same picture
    s = sharded["merged"]
    assert s["merged_parts"] == K and s["up_to_date"] is False and s["files_per_s"] is None
    assert s["counts"] == sharded["ref_summary"]["counts"] and set(s["counts"]) == {"train", "val", "test"}


def test_patients_split_over_the_whole_plan_not_per_part(sharded):
    items = open_cache(sharded["out"]).items
    part_of = {it["id"]: it["shard"] % K for it in items}
    by_group: dict[str, list[dict]] = {}
    for it in items:
        by_group.setdefault(it["group"], []).append(it)
    straddling = [g for g, its in by_group.items() if len({part_of[it["id"]] for it in its}) > 1]
    assert len(straddling) >= 5  # patients whose slices were ingested by different parts ...
    assert all(len({it["split"] for it in its}) == 1 for its in by_group.values())  # ... each in one split
    # splitting a part's items on their own would give other splits: the test would see it
    part0 = [it for it in items if part_of[it["id"]] == 0]
    alone = group_split([it["group"] for it in part0], [it["label"] for it in part0], 0)
    assert any(alone[it["group"]] != it["split"] for it in part0)


def test_every_parts_failures_are_in_the_merged_record(sharded):
    merged = [json.loads(line) for line in (sharded["out"] / "errors.jsonl").read_text().splitlines()]
    names = {Path(e["path"]).name: e["reason"] for e in merged}
    assert names == {"notes.dcm": "not a DICOM file (no DICM preamble)", "bad_truncated.dcm": "truncated pixel data",
                     "bad_nopixels.dcm": "no pixel data", "zz_broken.jpg": names["zz_broken.jpg"]}
    assert names["zz_broken.jpg"].startswith("not a readable image")
    assert len(merged) == 4 == sharded["merged"]["n_failed"] and sharded["merged"]["errors"] == merged
    for i, part in enumerate(sharded["parts"]):
        assert part["n_failed"] >= 1 and part["part"] == {"part_id": i, "num_parts": K, "shards": [i], "merged": False}
        assert all(e in merged for e in part["errors"]), i
        assert sharded["records"][i]["n_failed"] == len([e for e in part["errors"] if Path(e["path"]).name != "notes.dcm"])
    # the planning failure is listed once, by part 0: the parts' counts add up to the cache's
    assert [sum(Path(e["path"]).name == "notes.dcm" for e in p["errors"]) for p in sharded["parts"]] == [1, 0, 0]
    assert sum(p["n_failed"] for p in sharded["parts"]) == len(merged)


def test_merge_table_lists_the_failures(sharded, tmp_path, capsys):
    out = fresh_parts(sharded, tmp_path / "c")
    rc, stdout, err = cli(capsys, "ingest", "--merge", "--out", out)
    assert rc == 3, err
    assert stdout.splitlines()[0] == f"cache {out}  (merged from 3 parts)" and "merged in" in stdout
    assert "4 input(s) failed" in err and f"see {out / 'errors.jsonl'}" in err
    assert sum(line.startswith("failed: ") for line in err.splitlines()) == 4 and "bad_nopixels.dcm: no pixel data" in err
    assert files(out) == files(sharded["ref"])


# ---------------------------------------------------------------------------------------- refusals
def one_line_error(rc: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    return lines[0]


def test_merge_refuses_a_missing_or_unfinished_part(sharded, tmp_path, capsys):
    out = fresh_parts(sharded, tmp_path / "c")
    shutil.rmtree(out / "parts" / "part-1-of-3")
    before = files(out)
    line = one_line_error(*cli(capsys, "ingest", "--merge", "--out", out)[::2])
    assert "part 1 of 3 is missing" in line and str(out / "parts" / "part-1-of-3") in line and "--part-id 1" in line
    assert files(out) == before  # nothing moved, nothing written
    shutil.copytree(sharded["parts_copy"] / "part-1-of-3", out / "parts" / "part-1-of-3")
    (out / "parts" / "part-2-of-3" / "part.json").unlink()  # as if part 2 were still running (or crashed)
    line = one_line_error(*cli(capsys, "ingest", "--merge", "--out", out)[::2])
    assert "part 2 of 3 is not finished" in line and "--resume" in line and str(out / "parts" / "part-2-of-3") in line
    shutil.copytree(sharded["parts_copy"] / "part-0-of-3", out / "parts" / "part-0-of-4")  # a stray from a K=4 run
    line = one_line_error(*cli(capsys, "ingest", "--merge", "--out", out)[::2])
    assert "different --num-parts (3, 4)" in line and "part-0-of-4" in line
    shutil.rmtree(out / "parts" / "part-0-of-4")
    (out / "parts" / "part-2-of-3" / "part.json").write_bytes((sharded["parts_copy"] / "part-2-of-3" / "part.json").read_bytes())
    (out / "parts" / "part-0-of-3" / "shards" / "00000.bin").unlink()  # a part whose shard went missing
    line = one_line_error(*cli(capsys, "ingest", "--merge", "--out", out)[::2])
    assert "part 0 of 3 lacks shards/00000.bin" in line and str(out / "parts" / "part-0-of-3") in line
    assert not (out / "manifest.json").exists() and not (out / "shards").exists()
    line = one_line_error(*cli(capsys, "ingest", "--merge", "--out", tmp_path / "empty")[::2])
    assert "nothing to merge" in line


def test_a_cache_of_other_inputs_is_replaced_only_with_overwrite(sharded, tmp_path, capsys):
    out = tmp_path / "c"
    shutil.copytree(sharded["ref"], out)
    mf = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**mf, "fingerprint": "f" * 16}))
    (out / "shards" / "00007.bin").write_bytes(b"a shard of the old cache")
    line = one_line_error(*cli(capsys, "ingest", sharded["src"], "--out", out, *ARGS, "--num-parts", K, "--part-id", 0)[::2])
    assert "holds a cache of different inputs" in line and "--overwrite" in line  # told before the part's work
    assert not (out / "parts").exists()
    fresh_parts(sharded, out)
    line = one_line_error(*cli(capsys, "ingest", "--merge", "--out", out)[::2])
    assert "holds a cache of different inputs" in line and "--overwrite" in line
    assert (out / "parts").exists() and json.loads((out / "manifest.json").read_text())["fingerprint"] == "f" * 16
    assert cli(capsys, "ingest", "--merge", "--out", out, "--overwrite")[0] == 3
    assert files(out) == files(sharded["ref"])  # the old cache's files are gone, its stray shard too


def test_merge_refuses_a_part_of_other_options(sharded, tmp_path, capsys):
    out = fresh_parts(sharded, tmp_path / "c")
    # the same part with another --size: refused into the old part's folder, then written with --overwrite
    rc, _, err = cli(capsys, "ingest", sharded["src"], "--out", out, "--size", "24", "--workers", "1", "--num-parts", K,
                     "--part-id", 1)
    assert "holds a part of different inputs/preprocessing" in one_line_error(rc, err)
    run_part(capsys, sharded["src"], out, 1, K, "--size", "24", "--overwrite")
    assert json.loads((out / "parts" / "part-1-of-3" / "part.json").read_text())["header"]["shape"] == [3, 24, 24]
    before = files(out)
    line = one_line_error(*cli(capsys, "ingest", "--merge", "--out", out)[::2])
    assert "part 1 of 3 was planned from other inputs or options than part 0" in line
    assert "preprocessing" in line and str(out / "parts" / "part-1-of-3") in line
    assert files(out) == before
    # other input files, same options: the fingerprint differs
    rec = json.loads((sharded["parts_copy"] / "part-2-of-3" / "part.json").read_text())
    shutil.rmtree(out / "parts" / "part-1-of-3")
    shutil.copytree(sharded["parts_copy"] / "part-1-of-3", out / "parts" / "part-1-of-3")
    (out / "parts" / "part-2-of-3" / "part.json").write_text(json.dumps({**rec, "fingerprint": "0" * 16}))
    line = one_line_error(*cli(capsys, "ingest", "--merge", "--out", out)[::2])
    assert "part 2 of 3" in line and "fingerprint" in line


def test_bad_command_lines(sharded, tmp_path, capsys):
    src, out = sharded["src"], tmp_path / "c"
    for argv, words in (
        (["--merge", "--out", out, src], "does not go with SOURCE"),
        (["--merge", "--out", out, "--size", "24"], "does not go with --size"),
        (["--merge", "--out", out, "--num-parts", "3"], "does not go with --num-parts"),
        (["--out", out], "SOURCE"),
        ([src, "--out", out, "--part-id", "0"], "go together"),
        ([src, "--out", out, "--num-parts", "3", "--part-id", "3"], "not a part of 3"),
        ([src, "--out", out, "--num-parts", "0", "--part-id", "0"], "--num-parts"),
    ):
        rc, _, err = cli(capsys, "ingest", *argv)
        assert rc == 2 and words in err and "Traceback" not in err, (argv, err)
    assert not out.exists()
    # a plain ingest into a folder of unmerged parts says to merge them
    parts = fresh_parts(sharded, tmp_path / "p")
    line = one_line_error(*cli(capsys, "ingest", src, "--out", parts, *ARGS)[::2])
    assert "medclf ingest --merge" in line and "--overwrite" in line


# ---------------------------------------------------------------------------- resume and re-runs
def test_interrupted_part_and_merge_resume_to_the_single_ingest(sharded, tmp_path, capsys, monkeypatch):
    import medclf.data.ingest as ing

    src, out = sharded["src"], tmp_path / "c"
    real, calls = ing.process_shard, []

    def ctrl_c_on_shard_2(o, idx, units, pre):
        calls.append(idx)
        if idx == 2:
            raise KeyboardInterrupt
        return real(o, idx, units, pre)

    monkeypatch.setattr(ing, "process_shard", ctrl_c_on_shard_2)
    argv = ["ingest", src, "--out", out, *ARGS, "--num-parts", 2]
    assert cli(capsys, *argv, "--part-id", 0)[0] == 130  # part 0 of 2 holds shards 0 and 2
    part0 = out / "parts" / "part-0-of-2"
    assert calls == [0, 2] and not (part0 / "part.json").exists() and (part0 / ".ingest" / "plan.json").exists()
    line = one_line_error(*cli(capsys, "ingest", "--merge", "--out", out)[::2])
    assert "part 0 of 2 is not finished" in line
    calls.clear()
    monkeypatch.setattr(ing, "process_shard", lambda o, idx, units, pre: (calls.append(idx), real(o, idx, units, pre))[1])
    assert cli(capsys, *argv, "--part-id", 0, "--resume")[0] == 3
    assert calls == [2]  # shard 0 was not redone
    assert cli(capsys, *argv, "--part-id", 1)[0] == 3
    # the merge stops after moving part 0's shards: no manifest, and running it again finishes it
    real_move = ing.parts_.move_shards

    def crash_after_first(part, dst):
        real_move(part, dst)
        raise KeyboardInterrupt

    monkeypatch.setattr(ing.parts_, "move_shards", crash_after_first)
    assert cli(capsys, "ingest", "--merge", "--out", out)[0] == 130
    assert not (out / "manifest.json").exists() and (out / "shards" / "00000.bin").exists()
    assert not (part0 / "shards" / "00000.bin").exists()
    with pytest.raises(MedclfError, match="--merge"):
        open_cache(out)
    monkeypatch.setattr(ing.parts_, "move_shards", real_move)
    rc, stdout, err = cli(capsys, "ingest", "--merge", "--out", out, "--json")
    assert rc == 3, err
    assert files(out) == files(sharded["ref"])  # K=2 with a resumed part and merge: the same bytes as K=3 and as one


def test_reruns_after_the_merge_are_noops(sharded, tmp_path, capsys):
    out = tmp_path / "c"
    shutil.copytree(sharded["out"], out)
    before = files(out)
    d = run_part(capsys, sharded["src"], out, 1)
    assert d["up_to_date"] and d["part"]["merged"] and d["cache"] == str(out)  # the cache is complete: nothing to do
    rc, stdout, _ = cli(capsys, "ingest", "--merge", "--out", out)
    assert rc == 3 and "up to date" in stdout.splitlines()[0]
    rc, stdout, _ = cli(capsys, "ingest", sharded["src"], "--out", out, "--size", "16", "--workers", "1")
    assert rc == 3 and "up to date" in stdout.splitlines()[0]  # the merged cache is the single ingest's, fingerprint and all
    assert files(out) == before
    # a part re-run before the merge is a no-op too
    parts = fresh_parts(sharded, tmp_path / "p")
    before = files(parts)
    d = run_part(capsys, sharded["src"], parts, 2)
    assert d["up_to_date"] and not d["part"]["merged"] and d["cache"] == str(parts / "parts" / "part-2-of-3")
    assert files(parts) == before
