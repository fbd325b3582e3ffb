"""Time and peak memory of the verifier's readers on the largest hostile inputs the limits allow.

Each case runs in its own process (peak RSS is per process) and prints one line: the case, the
seconds, the peak resident memory and how it ended. The figures go to docs/threat-model.md
("Hostile input"). Usage: `python bench/hostile_bounds.py [CASE ...]`.
"""

from __future__ import annotations

import json
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _safetensors_max_header(tmp: Path) -> None:
    """The largest header accepted: 200,000 one-byte tensors in a 32 MiB header."""
    from attest.digest import MAX_SAFETENSORS_HEADER, MAX_TENSORS, read_safetensors_index

    header = {f"model.layers.{i:06d}.weight": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]}
              for i in range(MAX_TENSORS)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (MAX_SAFETENSORS_HEADER - len(raw))
    p = tmp / "m.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(MAX_TENSORS))
    print(f"  {len(read_safetensors_index(p))} tensors", end="")


def _safetensors_aliased(tmp: Path) -> None:
    """A 17 MB file whose 5,000 tensors alias one 16 MiB range (refused before hashing)."""
    from attest.digest import DigestError, hash_safetensors

    n = 16 << 20
    header = {f"t{i}": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]} for i in range(5000)}
    raw = json.dumps(header).encode()
    p = tmp / "a.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(n))
    try:
        hash_safetensors(p)
    except DigestError as e:
        print(f"  refused: {str(e)[len(str(p)) + 2:][:60]}", end="")


def _chain_line_max(tmp: Path) -> None:
    """One 64 MiB chain line (the per-line limit) of small numbers in a list."""
    from attest import jsonread
    from attest.chain import MAX_LINE_BYTES

    body = b"[" + b"1," * ((MAX_LINE_BYTES - 16) // 2) + b"1]"
    jsonread.loads(body, "chain.jsonl:1", MAX_LINE_BYTES)


def _chain_line_objects(tmp: Path) -> None:
    """One 64 MiB chain line of small objects (every one goes through the duplicate-key hook)."""
    from attest import jsonread
    from attest.chain import MAX_LINE_BYTES

    one = b'{"a":1,"b":"xy"},'
    body = b"[" + one * ((MAX_LINE_BYTES - 16) // len(one)) + b"{}]"
    jsonread.loads(body, "chain.jsonl:1", MAX_LINE_BYTES)


def _deep_and_digits(tmp: Path) -> None:
    """Refusals: 1,000,000-deep nesting and a 1,000,000-digit integer in one 64 MiB-bounded parse each."""
    from attest import jsonread

    for data in (b"[" * 1_000_000 + b"]" * 1_000_000, b"9" * 1_000_000):
        try:
            jsonread.loads(data, "x", 64 << 20)
        except jsonread.JsonReadError as e:
            print(f"  refused: {str(e)[3:][:40]}", end="")


CASES = {"safetensors-max-header": _safetensors_max_header, "safetensors-aliased": _safetensors_aliased,
         "chain-line-64MiB-numbers": _chain_line_max, "chain-line-64MiB-objects": _chain_line_objects,
         "deep-and-digits": _deep_and_digits}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        with tempfile.TemporaryDirectory() as tmp:
            t = time.monotonic()
            CASES[sys.argv[2]](Path(tmp))
            took = time.monotonic() - t
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"  {took:.2f} s, peak RSS {rss:.0f} MiB")
        return
    names = sys.argv[1:]
    if names == ["--smoke"]:  # a seconds-sized run (the test suite runs it, so the bench cannot rot)
        names = ["safetensors-aliased"]
    for name in names or CASES:
        print(name, end="", flush=True)
        subprocess.run([sys.executable, __file__, "--one", name], check=True)


if __name__ == "__main__":
    main()
