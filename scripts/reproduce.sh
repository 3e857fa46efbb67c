#!/usr/bin/env bash
# Reproduce one of Favero et al.'s binary tasks end to end: ingest -> finetune -> eval -> explain.
#
#   scripts/reproduce.sh chexpert-effusion|isic-melanoma [--quick] [--out DIR] [--data ROOT] [--device auto|cpu|cuda]
#
# Data root: --data, else $MEDCLF_DATA/chexpert (CheXpert-v1.0-small as shipped) or $MEDCLF_DATA/isic.
# Defaults follow the paper (256 px, DiT-B/4); the test split is scored twice: with Favero et al.'s
# protocol (majority vote over 501 trials, full budget: --decision vote --full --budget 501) and with
# medclf's default (calibrated posterior, adaptive budget), and the two are printed side by side.
# --quick is a minutes-long smoke run (8 trials instead of 501).
# Stops at the first failing step with that step's exit code (ingest's 3, "some files failed", is
# reported and the run goes on: real archives have a few bad files).
set -uo pipefail
TASK=${1:?usage: reproduce.sh chexpert-effusion|isic-melanoma [--quick] [--out DIR] [--data ROOT]}
shift
QUICK=0; OUT=""; DATA=""; DEVICE=auto
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --out) OUT=$2; shift ;;
    --data) DATA=$2; shift ;;
    --device) DEVICE=$2; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
case "$TASK" in
  chexpert-effusion) BASE=chexpert; WINDOW=brain ;;
  isic-melanoma) BASE=isic; WINDOW=brain ;;
  *) echo "unknown task $TASK (chexpert-effusion, isic-melanoma)" >&2; exit 2 ;;
esac
if [ -z "$DATA" ]; then DATA=${MEDCLF_DATA:?set MEDCLF_DATA or pass --data}/$BASE; fi
OUT=${OUT:-runs/$TASK}
HERE=$(cd "$(dirname "$0")/.." && pwd)
MEDCLF=${MEDCLF:-$( [ -x "$HERE/.venv/bin/medclf" ] && echo "$HERE/.venv/bin/medclf" || echo medclf )}
if [ "$QUICK" = 1 ]; then
  SIZE=32; ARCH=dit; MSIZE=tiny; STEPS=60; BATCH=8; TRIALS=8; LR=1e-3; WARM=5
else
  SIZE=256; ARCH=dit; MSIZE=base; STEPS=100000; BATCH=64; TRIALS=501; LR=1e-4; WARM=1000
fi
mkdir -p "$OUT"

step() {
  echo "== $*" >&2
  "$@"
  rc=$?
  if [ $rc -ne 0 ]; then echo "step failed with exit code $rc: $*" >&2; exit $rc; fi
}

echo "== $MEDCLF ingest $DATA" >&2
"$MEDCLF" ingest "$DATA" --dataset "$TASK" --out "$OUT/cache" --size $SIZE --window $WINDOW
rc=$?
if [ $rc -eq 3 ]; then echo "note: some input files failed; see $OUT/cache/errors.jsonl" >&2
elif [ $rc -ne 0 ]; then echo "step failed with exit code $rc: ingest" >&2; exit $rc; fi
if [ -f "$OUT/run/model.safetensors" ]; then
  echo "== $OUT/run already trained; skipping finetune" >&2
else
  RESUME=""; [ -d "$OUT/run/checkpoints" ] && RESUME=--resume
  step "$MEDCLF" finetune "$OUT/cache" --out "$OUT/run" --method diffusion-classifier --arch $ARCH --model-size $MSIZE \
       --steps $STEPS --batch-size $BATCH --lr $LR --warmup-steps $WARM --trials $TRIALS --device "$DEVICE" $RESUME
fi
# Favero et al.'s protocol: every trial votes for its argmin class, all trials, no calibration in the decision
step "$MEDCLF" eval --model "$OUT/run" --dataset "$TASK" --data "$OUT/cache" --split test --report "$OUT/report-favero" \
     --decision vote --full --budget $TRIALS --device "$DEVICE"
# medclf's default: calibrated posterior (class prior restored), adaptive budget with calibrated pruning
step "$MEDCLF" eval --model "$OUT/run" --dataset "$TASK" --data "$OUT/cache" --split test --report "$OUT/report" \
     --budget $TRIALS --device "$DEVICE"
python3 - "$OUT/report-favero/metrics.json" "$OUT/report/metrics.json" <<'PY'
import json, sys
rows = [("Favero et al. (vote, full budget)", json.load(open(sys.argv[1]))), ("medclf default (posterior, adaptive)", json.load(open(sys.argv[2])))]
def num(m, *keys):
    for k in keys:
        v = m.get(k)
        if isinstance(v, dict):
            v = v.get("value", v.get("mean"))
        if isinstance(v, (int, float)):
            return v
    return float("nan")
print(f"{'protocol':40s} {'accuracy':>9s} {'bal.acc':>8s} {'AUROC':>7s} {'ECE':>7s} {'NFE/img':>8s}")
for name, m in rows:
    print(f"{name:40s} {num(m, 'accuracy'):9.4f} {num(m, 'balanced_accuracy'):8.4f} {num(m, 'auroc', 'auroc_macro'):7.4f} "
          f"{num(m, 'ece'):7.4f} {num(m, 'nfe_per_image'):8.1f}")
PY
# explain the first four test cases
CASES=$(python3 - "$OUT/cache" "$DATA" <<'PY'
import json, sys, pathlib
cache, data = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
items = [json.loads(l) for l in (cache / "items.jsonl").read_text().splitlines()]
for it in [i for i in items if i["split"] == "test"][:4]:
    p = data / it["source"]
    print(p if p.exists() else data.parent / it["source"])
PY
)
# shellcheck disable=SC2086
step "$MEDCLF" explain $CASES --model "$OUT/run" --out "$OUT/explain" --device "$DEVICE"
echo "done: $OUT (cache/, run/, report/, explain/)" >&2
