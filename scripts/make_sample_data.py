#!/usr/bin/env python
"""Generate the deterministic synthetic demo data (RSNA-style DICOM, NIfTI, ISIC JPEGs).

Usage: python scripts/make_sample_data.py [OUT_DIR] [--seed N]   (default OUT_DIR: <repo>/sample_data)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", type=Path, default=REPO_ROOT / "sample_data",
                        help="output directory (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    args = parser.parse_args(argv)
    if str(REPO_ROOT) not in sys.path:  # allow running from a checkout without installing
        sys.path.insert(0, str(REPO_ROOT))
    from medclf.synthetic import make_sample_data

    summary = make_sample_data(args.out_dir, seed=args.seed)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
