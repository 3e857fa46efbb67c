"""classify shows progress on a large batch: a bar on a terminal, plain lines in a log."""

from __future__ import annotations

from conftest import SAMPLE


def test_plain_progress_lines_only_when_slow(capsys):
    from medclf.cli._common import item_progress

    with item_progress("classify", fancy=False, every_s=0.0) as cb:
        for k in range(1, 4):
            cb(k, 3)
    err = capsys.readouterr().err
    assert "classify: 1/3 inputs" in err and "classify: 2/3 inputs" in err and "3/3" not in err
    with item_progress("classify", fancy=False, every_s=3600.0) as cb:  # a short batch prints nothing
        for k in range(1, 4):
            cb(k, 3)
    assert capsys.readouterr().err == ""


def test_score_inputs_reports_each_planned_item(tiny_run, tmp_path):
    from medclf.inference import load_scorer, score_inputs

    files = [str(p) for p in sorted((SAMPLE / "rsna" / "stage_2_train").glob("*.dcm"))[:3]]
    missing = str(tmp_path / "missing.dcm")
    run, scorer, pre = load_scorer(tiny_run, "cpu", trials=2)
    seen: list[tuple[int, int]] = []
    out = list(score_inputs([*files, missing], scorer, pre, run=run, progress=lambda d, n: seen.append((d, n))))
    assert len(out) == 4  # three rows and the missing file's error
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
