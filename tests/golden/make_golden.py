"""Write tests/golden/v1/: a small bundle in bundle format v1 (docs/bundle-format.md), checked in and
verified by tests/test_golden_bundle.py by every later version (a format change that breaks reading
it fails there). Made with the synthetic bundle factory: real signatures, chain, safetensors and
export/, a genesis re-derived by the factory's deriver. The private key is thrown away.

    python tests/golden/make_golden.py    # only for a new format version, into a new folder
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent.parent)]

from bundlefactory import make_bundle  # noqa: E402

VERSION = "v1"


def main() -> None:
    out = HERE / VERSION
    if out.exists():
        sys.exit(f"{out}: exists; a golden bundle is never rewritten (make a new version's folder)")
    with tempfile.TemporaryDirectory() as tmp:
        root, _ = make_bundle(Path(tmp) / "bundle", Path(tmp) / "key", steps=(2, 4))
        shutil.copytree(root, out)
    print(f"golden bundle: {out}")


if __name__ == "__main__":
    main()
