#!/usr/bin/env bash
# Classify every image in a folder or archive (.zip, .tar, .tar.gz, .tgz) into one JSON-lines or CSV file.
#
#   scripts/classify_archive.sh INPUT OUTPUT.jsonl|OUTPUT.csv [--model RUN] [--budget N] [--device auto|cpu|cuda]
#
# The output is written to a temp file and renamed when complete. Exit code: classify's
# (0 all classified, 3 some inputs failed: their error lines are in the JSON-lines output / on stderr).
set -uo pipefail
IN=${1:?usage: classify_archive.sh INPUT OUTPUT [--model RUN]}
OUTFILE=${2:?usage: classify_archive.sh INPUT OUTPUT [--model RUN]}
shift 2
HERE=$(cd "$(dirname "$0")/.." && pwd)
MEDCLF=${MEDCLF:-$( [ -x "$HERE/.venv/bin/medclf" ] && echo "$HERE/.venv/bin/medclf" || echo medclf )}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
case "$IN" in
  *.zip) python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$IN" "$WORK/x" || exit 1; ROOT="$WORK/x" ;;
  *.tar|*.tar.gz|*.tgz) mkdir -p "$WORK/x" && tar -xf "$IN" -C "$WORK/x" || exit 1; ROOT="$WORK/x" ;;
  *) [ -d "$IN" ] || { echo "error: $IN: not a folder or a .zip/.tar archive" >&2; exit 1; }; ROOT="$IN" ;;
esac
find "$ROOT" -type f \( -iname '*.dcm' -o -iname '*.nii' -o -iname '*.nii.gz' -o -iname '*.png' -o -iname '*.jpg' \
  -o -iname '*.jpeg' -o -iname '*.tif' -o -iname '*.tiff' \) | sort > "$WORK/list.txt"
[ -s "$WORK/list.txt" ] || { echo "error: $IN: no image files found" >&2; exit 1; }
case "$OUTFILE" in *.csv) FMT=--csv ;; *) FMT=--json ;; esac
mkdir -p "$(dirname "$OUTFILE")"
TMP="$OUTFILE.partial"
"$MEDCLF" classify - $FMT "$@" < "$WORK/list.txt" > "$TMP"
rc=$?
if [ $rc -eq 0 ] || [ $rc -eq 3 ]; then mv "$TMP" "$OUTFILE"; else rm -f "$TMP"; fi
echo "$(wc -l < "$WORK/list.txt") files -> $OUTFILE (exit $rc)" >&2
exit $rc
