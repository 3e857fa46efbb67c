#!/usr/bin/env bash
# End-to-end demo on the bundled sample data, on CPU (a few minutes): set up, ingest the head-CT
# phantoms, train a small diffusion classifier, evaluate it on held-out patients, explain one scan.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${1:-demo_out}
MEDCLF=.venv/bin/medclf
mkdir -p "$OUT"
echo "== 1/5 regenerate the sample data into $OUT/sample_data (deterministic: identical to sample_data/)"
.venv/bin/python scripts/make_sample_data.py "$OUT/sample_data" > "$OUT/sample_data.json"
echo "== 2/5 ingest the RSNA-layout head-CT phantoms (one truncated file fails on purpose: exit 3 is expected)"
rc=0
$MEDCLF ingest "$OUT/sample_data/rsna" --out "$OUT/cache" --size 32 --window brain || rc=$?
if [ "$rc" -ne 0 ] && [ "$rc" -ne 3 ]; then exit "$rc"; fi
echo "== 3/5 train a diffusion classifier (MONAI UNet, class-conditional; ~3 min on 2 CPU cores)"
if [ ! -f "$OUT/run/model.safetensors" ]; then
  $MEDCLF finetune "$OUT/cache" --out "$OUT/run" --arch unet --model-size tiny --steps 800 --batch-size 32 \
    --lr 1e-3 --warmup-steps 50 --ema-decay 0.99 --trials 32 --checkpoint-every 400 --device cpu
fi
echo "== 4/5 evaluate on the held-out test patients"
$MEDCLF eval --model "$OUT/run" --data "$OUT/cache" --split test --report "$OUT/report" --device cpu
echo "== 5/5 explain one positive test slice"
CASE=$(.venv/bin/python - "$OUT/cache" "$OUT/sample_data/rsna" <<'PY'
import json, sys, pathlib
items = [json.loads(l) for l in (pathlib.Path(sys.argv[1]) / "items.jsonl").read_text().splitlines()]
it = next(i for i in items if i["split"] == "test" and i["label"] == 1)
print(pathlib.Path(sys.argv[2]) / it["source"])
PY
)
$MEDCLF explain "$CASE" --model "$OUT/run" --out "$OUT/explain" --device cpu
# classify the case's whole series (the sample keeps every series in one folder: link its readable files
# into one) and write a DICOM SR for it
SERIES="$OUT/series"
.venv/bin/python - "$CASE" "$SERIES" <<'PY'
import pathlib, sys, pydicom
case, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
uid = pydicom.dcmread(case, stop_before_pixels=True).SeriesInstanceUID
dst.mkdir(parents=True, exist_ok=True)
for f in sorted(case.parent.glob("*.dcm")):
    try:
        ds = pydicom.dcmread(f)
        ok = ds.SeriesInstanceUID == uid and ds.pixel_array.size > 0
    except Exception:  # the sample's truncated file
        continue
    if ok and not (dst / f.name).exists():
        (dst / f.name).symlink_to(f.resolve())
PY
$MEDCLF classify "$SERIES" --model "$OUT/run" --json --device cpu --dicom-sr "$OUT/sr"
# explain the same series, its maps also as DICOM Parametric Maps (one multi-frame object per map kind)
$MEDCLF explain "$SERIES" --model "$OUT/run" --out "$OUT/explain" --dicom "$OUT/dicom_maps" --device cpu
echo
echo "results:"
echo "  cache        $OUT/cache        (manifest.json, items.jsonl, errors.jsonl)"
echo "  model run    $OUT/run          (config.json, model.safetensors, metrics.jsonl)"
echo "  eval report  $OUT/report       (metrics.json, roc.png, reliability.png, confusion.png)"
echo "  explanation  $OUT/explain      (evidence/error NIfTI maps, overlay.png, summary.json)"
echo "  DICOM SR     $OUT/sr           (one TID 1500 Structured Report for the case's series)"
echo "  DICOM maps   $OUT/dicom_maps   (Parametric Maps of the series: series_evidence.dcm, series_error_*.dcm, ...)"
