"""Sharded inference (issue #15): ``--num-parts K --part-id I`` parts and torchrun ranks each score a
contiguous block of the planned inputs, in input order. The parts' outputs concatenated, and rank 0's
merge, are one process's output; a bad input is reported by exactly one part; eval's ranks give the
metrics of one process; explain's parts write into one --out without colliding."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO, run_cli, write_bad_dicom, write_ct
from medclf.cli import app
from medclf.cli._common import run_app
from medclf.errors import MedclfError
from medclf.sharding import Share, block, process_share

TIMING = ("seconds", "images_per_s")  #: the only metrics that differ between two runs of one process
FOUR_D = "explain does not support 4-D NIfTI"


# ------------------------------------------------------------------------------------ the partition
def test_blocks_tile_the_items_in_order_and_differ_by_at_most_one():
    for n in range(40):
        for k in range(1, 9):
            bounds = [block(n, k, i) for i in range(k)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, in order, no overlap
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1
    assert [block(10, 3, i) for i in range(3)] == [(0, 3), (3, 6), (6, 10)]
    with pytest.raises(MedclfError, match="0..2"):
        block(5, 3, 3)


def test_ranks_split_their_part_and_eval_batches_stay_whole():
    shares = [Share(part=p, parts=3, rank=r, world=2) for p in range(3) for r in range(2)]
    b = [s.bounds(23) for s in shares]  # part by part, rank by rank: still one tiling of [0, 23) in order
    assert b[0][0] == 0 and b[-1][1] == 23 and all(x[1] == y[0] for x, y in zip(b, b[1:]))
    assert [Share(part=p, parts=3).bounds(23) for p in range(3)] == [(0, 7), (7, 15), (15, 23)]
    # eval cuts only between batches of 4: every rank scores exactly the batches one process would
    assert [Share(rank=r, world=3).bounds(23, unit=4) for r in range(3)] == [(0, 8), (8, 16), (16, 23)]
    assert [Share(rank=r, world=2).bounds(3, unit=4) for r in range(2)] == [(0, 0), (0, 3)]  # fewer batches than ranks
    assert Share().whole and not Share(part=0, parts=2).whole and not Share(world=2).whole


def test_process_share_reads_the_options_and_refuses_half_of_them(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert process_share() == Share()
    assert process_share(4, 3) == Share(part=3, parts=4)
    for bad in ((4, None), (None, 0), (4, 4)):
        with pytest.raises(MedclfError):
            process_share(*bad)


# ------------------------------------------------------------------------------------------ inputs
def _png(path: Path, seed: int) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(seed).random((20, 24)) * 255).astype(np.uint8)).save(path)
    return path


def _series(folder: Path, uid: str, patient: int, n: int, prefix: str) -> list[Path]:
    """``n`` 16x16 CT slices of one series, 1 mm apart, written in reverse position order."""
    return [write_ct(folder / f"{prefix}{k}.dcm", np.full((16, 16), 1000 + 30 * k, np.int16), ipp=(0.0, 0.0, float(n - 1 - k)),
                     instance=n - k, series_uid=uid, study_uid=f"{uid}.1", patient=patient) for k in range(n)]


def _nifti_4d(path: Path, volumes: int = 3) -> Path:
    rng = np.random.default_rng(5)
    data = np.stack([rng.normal(100.0 * (t + 1), 10.0, (16, 16, 4)) for t in range(volumes)], axis=-1).astype(np.float32)
    aff = np.diag([1.5, 1.5, 3.0, 1.0])
    nib.save(nib.Nifti1Image(data, aff), path)
    return path


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> dict:
    """Ten planned items, in order: a PNG, a 4-D NIfTI's three volumes, then a folder holding two DICOM
    series, three PNGs and a truncated DICOM (the last item). In 3 parts: [PNG, vol 0, vol 1],
    [vol 2, series a, series b], [3 PNGs, bad file]: the 4-D file is split, the series are not."""
    root = tmp_path_factory.mktemp("batch")
    d = root / "archive"
    a = _series(d, "1.2.826.0.1.3680043.8.498.501", 1, 3, "a_")
    _series(d, "1.2.826.0.1.3680043.8.498.502", 2, 2, "b_")
    pngs = [_png(d / f"p{k}.png", k + 1) for k in range(3)]
    bad = write_bad_dicom(d / "zz_cut.dcm", "truncated")
    lone, func = _png(root / "lone.png", 0), _nifti_4d(root / "func.nii.gz")
    return {"inputs": [str(lone), str(func), str(d)], "bad": str(bad),
            "clean": [str(p) for p in (lone, func, *pngs, *a)]}  # the same kinds, no bad file, as single files


def _cli(capsys, *args) -> tuple[int, str, str]:
    rc = run_app(app, [str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _merge_csv(parts: list[str]) -> str:
    """The documented merge, ``awk 'FNR==1 && NR>1 {next} 1' part*.csv``: every part's CSV starts with
    the header; keep the first header printed (an empty part prints nothing, header included)."""
    out, seen = [], False
    for text in parts:
        if text and seen:
            text = text.split("\n", 1)[1]
        seen = seen or bool(text)
        out.append(text)
    return "".join(out)


# --------------------------------------------------------------------------------------- --num-parts
def test_parts_concatenated_are_one_process_json(tiny_run, batch, capsys):
    common = ["classify", *batch["inputs"], "--model", tiny_run, "--budget", "2", "--device", "cpu", "--json"]
    rc, whole, whole_err = _cli(capsys, *common)
    assert rc == 3 and whole_err.count("error:") == 1, whole_err
    parts = [_cli(capsys, *common, "--num-parts", 3, "--part-id", i) for i in range(3)]
    assert "".join(out for _, out, _ in parts) == whole  # cat part0.jsonl part1.jsonl part2.jsonl
    rows = [[json.loads(line) for line in out.splitlines()] for _, out, _ in parts]
    volumes = [sorted({r["volume"] for r in rs if r.get("volume") is not None}) for rs in rows]
    assert volumes == [[0, 1], [2], []]  # the 4-D file's volumes are split ...
    series = [sorted({r["series"] for r in rs if "series" in r}) for rs in rows]
    assert [len(s) for s in series] == [0, 2, 0]  # ... a series never is (all its slices in one part)
    # the bad file: one part reports it (its JSON error line, its stderr line, exit 3); the others exit 0
    reporting = [i for i, (_, out, err) in enumerate(parts) if batch["bad"] in out or batch["bad"] in err]
    assert reporting == [2], [p[2] for p in parts]
    assert [rc for rc, _, _ in parts] == [0, 0, 3]
    assert parts[2][2].count(f"error: {batch['bad']}: truncated pixel data") == 1


def test_csv_parts_each_start_with_the_header_and_merge_to_one_process_csv(tiny_run, batch, capsys, tmp_path):
    common = ["classify", *batch["inputs"], "--model", tiny_run, "--budget", "2", "--device", "cpu", "--csv"]
    _, whole, _ = _cli(capsys, *common)
    header = whole.splitlines()[0]
    assert header.startswith("input,slice,prediction")
    parts = [_cli(capsys, *common, "--num-parts", 3, "--part-id", i)[1] for i in range(3)]
    assert all(p.splitlines()[0] == header for p in parts)  # each part a CSV of its own
    rc, empty, _ = _cli(capsys, *common, "--num-parts", 12, "--part-id", 0)  # 10 items in 12 parts: nothing to do
    assert rc == 0 and empty == ""
    assert _merge_csv([empty, *parts]) == whole
    if shutil.which("awk"):  # the command --help gives, on the files
        files = []
        for i, text in enumerate([empty, *parts]):
            files.append(tmp_path / f"part{i}.csv")
            files[-1].write_text(text, newline="")
        got = subprocess.run(["awk", "FNR==1 && NR>1 {next} 1", *map(str, files)], capture_output=True, check=True)
        assert got.stdout == whole.encode()


def test_part_options_go_together_and_stay_in_range(capsys, tmp_path):
    png = _png(tmp_path / "a.png", 0)
    for extra, hint in ((["--num-parts", "3"], "--num-parts"), (["--part-id", "0"], "--part-id"),
                        (["--num-parts", "3", "--part-id", "3"], "--part-id")):
        rc, _, err = _cli(capsys, "classify", png, "--model", tmp_path / "norun", *extra)
        assert rc == 2 and hint in err, (extra, err)  # a usage error, before any model is looked for


def test_eval_refuses_parts_and_says_to_use_torchrun(tiny_run, tiny_cache, capsys):
    rc, _, err = _cli(capsys, "eval", "--model", tiny_run, "--data", tiny_cache, "--num-parts", 2, "--part-id", 0)
    assert rc == 2 and "torchrun" in err, err


def test_explain_parts_write_into_one_folder_without_collisions(tiny_run, tmp_path, capsys):
    func = _nifti_4d(tmp_path / "func.nii.gz")
    pngs = [_png(tmp_path / d / "scan.png", k) for k, d in enumerate("xyz")]  # three inputs, one base name
    common = ["explain", func, *pngs, "--model", tiny_run, "--budget", "2", "--device", "cpu", "--json"]
    rc, whole, err = _cli(capsys, *common, "--out", tmp_path / "one")
    assert rc == 3 and err.count(FOUR_D) == 1
    # 6 items in 3 parts: [vol 0, vol 1], [vol 2, x/scan], [y/scan, z/scan]
    parts = [_cli(capsys, *common, "--out", tmp_path / "parts", "--num-parts", 3, "--part-id", i) for i in range(3)]
    assert "".join(out for _, out, _ in parts) == whole
    # the 4-D refusal: said once over all parts, though the file's volumes are in parts 0 and 1
    assert [err.count(FOUR_D) for _, _, err in parts] == [1, 0, 0]
    assert [rc for rc, _, _ in parts] == [3, 0, 0]
    one, together = tmp_path / "one", tmp_path / "parts"
    names = sorted(p.name for p in one.iterdir())
    assert names == ["scan", "scan-2", "scan-3"] and sorted(p.name for p in together.iterdir()) == names
    for name in names:  # each sub-folder holds the same input's maps as the single run's
        a, b = json.loads((one / name / "summary.json").read_text()), json.loads((together / name / "summary.json").read_text())
        assert a == b and a["source"] == str(pngs[names.index(name)])


# ------------------------------------------------------------------------------------------ torchrun
def _torchrun(*args, stdin: str | None = None, timeout: int = 480) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m medclf ...`` on CPU, one thread per rank (2 cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "medclf",
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO, input=stdin)


def _one(*args, **kw) -> subprocess.CompletedProcess:
    return run_cli(*args, env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "CUDA_VISIBLE_DEVICES": ""}, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["--json", "table"])
def test_torchrun_classify_prints_one_process_output_and_fails_for_any_rank(tiny_run, batch, fmt):
    args = ["classify", *batch["inputs"], "--model", tiny_run, "--budget", "2", "--device", "cpu",
            *([fmt] if fmt != "table" else [])]
    one = _one(*args, check_rc=3)
    two = _torchrun(*args)
    assert two.stdout == one.stdout, two.stderr[-3000:]
    # the bad file is rank 1's (items 5..9 of 10): rank 0 reports it, once, and exits 3 (torchrun then 1)
    assert two.stderr.count(f"error: {batch['bad']}: truncated pixel data") == 1, two.stderr[-3000:]
    assert two.returncode != 0 and "exitcode: 3" in two.stderr.replace("exitcode  :", "exitcode:")
    assert not [line for line in two.stderr.splitlines() if line.lstrip().startswith('File "') and "/medclf/" in line]


@pytest.mark.slow
def test_torchrun_classify_csv_from_stdin(tiny_run, batch):
    args = ["classify", "-", "--model", tiny_run, "--budget", "2", "--device", "cpu", "--csv"]
    listing = "\n".join(batch["clean"]) + "\n"
    one = _one(*args, input=listing, check_rc=0)
    two = _torchrun(*args, stdin=listing)  # stdin reaches rank 0, which shares the list
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == one.stdout and two.stdout.count("input,slice,prediction") == 1
    assert len(two.stdout.splitlines()) == 1 + 3 * 4 + 3 + 1 + 3  # header, 4-D volumes x slices, PNGs, the DICOMs


@pytest.mark.slow
def test_torchrun_eval_gives_the_metrics_of_one_process(tiny_run, tiny_cache, tmp_path):
    args = ["eval", "--model", tiny_run, "--data", tiny_cache, "--split", "test", "--budget", "2", "--bootstrap", "50",
            "--batch-size", "4", "--device", "cpu", "--json"]
    one = _one(*args, "--report", tmp_path / "one", check_rc=0)
    two = _torchrun(*args, "--report", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert a["n"] > 8  # more than one batch of 4 per rank: both ranks scored
    for m in (a, b):
        for k in TIMING:
            m.pop(k)
    assert a == b
    printed = json.loads(two.stdout)  # rank 0 prints the metrics once
    assert {k: v for k, v in printed.items() if k not in TIMING} == {k: v for k, v in json.loads(one.stdout).items()
                                                                     if k not in TIMING}


@pytest.mark.slow
def test_leaving_the_group_ends_gloos_threads_after_timm_and_monai_are_imported(tmp_path):
    """torch._dynamo (imported by timm and MONAI) kept a group made before it alive past
    destroy_process_group; gloo's threads then ran into interpreter exit and aborted a rank at
    random. Deterministic here: the threads are counted after ``Share.close``."""
    script = tmp_path / "ranks.py"
    script.write_text(
        "import os\n"
        "from medclf.sharding import process_share\n"
        "share = process_share()\n"
        "import monai, timm  # noqa: F401,E401  (as load_scorer imports them: after the group exists)\n"
        "assert share.from_root(lambda: 'hello') == 'hello'\n"
        "assert list(share.merged([share.rank])) == ([0, 1] if share.root else [])\n"
        "assert share.failures(share.rank + 1) == (3 if share.root else 0)\n"
        "share.close()\n"
        "names = [open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task')]\n"
        "assert not [n for n in names if 'gloo' in n], names\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
                       capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
