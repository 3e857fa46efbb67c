#!/usr/bin/env bash
# End-to-end demo on the bundled sample data, on CPU: set up, regenerate the sample data, ingest it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${1:-demo_out}
mkdir -p "$OUT"
echo "== generating the sample data into $OUT/sample_data (deterministic; same as sample_data/)"
.venv/bin/python scripts/make_sample_data.py "$OUT/sample_data" > "$OUT/sample_data.json"
echo "== medclf ingest (RSNA-layout head-CT phantoms; one truncated file is expected to fail -> exit 3)"
rc=0
.venv/bin/medclf ingest "$OUT/sample_data/rsna" --out "$OUT/cache-rsna" --size 64 --window brain,subdural,bone || rc=$?
if [ "$rc" -ne 0 ] && [ "$rc" -ne 3 ]; then exit "$rc"; fi
echo "== results: $OUT/cache-rsna (manifest.json, items.jsonl, errors.jsonl, shards/)"
