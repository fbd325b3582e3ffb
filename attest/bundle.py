"""The attestation bundle: a folder holding the chain, the public key(s) and every file the
chain's statements name as subjects, at the same relative paths as in the run directory.

Reading a received bundle goes through `safe_file`, which refuses absolute paths, `..`,
symlinks anywhere on the path and files above a size bound: a verifier never follows a path
out of the bundle.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from attest import inputs
from attest.chain import read_chain
from attest.errors import KaiError
from attest.layout import CHAIN_NAME, CONFIG_NAME, KEYS_DIR, SLSA_NAME

MAX_FILE_BYTES = 1 << 40  # 1 TiB: a bound, not a quota
# A shard `d/NAME.parquet` has its manifest at `d/.manifests/NAME.manifest.json`: beside it, but in a
# hidden folder that `pyarrow.dataset(d)` and `datasets.load_dataset(d)` skip.
MANIFEST_DIR = ".manifests"


class BundlePathError(KaiError, ValueError):
    """A name in the bundle points outside it, through a symlink, or at something not a file."""


def safe_file(root: Path, name: str, max_bytes: int = MAX_FILE_BYTES) -> Path:
    """Resolve `name` (a bundle-relative POSIX path) to a regular file inside `root`, through the
    door (attest.inputs): plain bounded names, no symlink on the path, a regular file within
    `max_bytes`. A missing file is a FileNotFoundError; every other refusal a BundlePathError."""
    try:
        return inputs.resolve(root, name, max_bytes, where=repr(name)[:300] if isinstance(name, str) else None)
    except inputs.InputMissing:
        raise FileNotFoundError(f"{name}: not in the bundle") from None
    except inputs.InputError as e:
        raise BundlePathError(str(e)) from None


def shard_manifest_name(shard: str) -> str:
    """The bundle-relative manifest name of the bundle-relative shard name `shard` (POSIX)."""
    folder, _, name = shard.rpartition("/")
    return f"{folder + '/' if folder else ''}{MANIFEST_DIR}/{name.removesuffix('.parquet')}.manifest.json"


def make_bundle(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], include_data: bool = True,
                light: bool = False) -> Path:
    """Copy the chain, public keys, resolved config and every subject file into `out_dir`. `light`:
    leave out the heavy state the team holds and produces on challenge (attest.challenge.held:
    genesis and checkpoint state shards, data shard files), so the size does not grow with the
    number of checkpoints."""
    from attest.challenge import held

    run, out = Path(run_dir), Path(out_dir)
    entries, _ = read_chain(run / CHAIN_NAME)
    names = {CHAIN_NAME, CONFIG_NAME}
    if (run / SLSA_NAME).is_file():  # the release's SLSA provenance (attest.slsa)
        names.add(SLSA_NAME)
    names |= {f"{KEYS_DIR}/{p.name}" for p in (run / KEYS_DIR).glob("*.pub.pem")}
    for e in entries:
        subjects = e.statement.get("subject")
        for s in subjects if isinstance(subjects, list) else []:
            if not isinstance(s, dict) or not isinstance(s.get("name"), str):
                raise BundlePathError(f"{run / CHAIN_NAME}:{e.lineno}: a subject without a name string")
            # shards can be large; their manifests (also subjects) always travel
            if light and held(e, s["name"]):
                continue
            if include_data or not (e.kind == "data-shard" and s["name"].endswith(".parquet")):
                names.add(s["name"])
    if out.exists():
        shutil.rmtree(out)
    for name in sorted(names):
        src = safe_file(run, name)
        dst = out / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    return out


def folder_entries(root: Path, top: str) -> list[tuple[str, bool]]:
    """Everything under the bundle folder `top` (e.g. "export"), as (bundle-relative POSIX name,
    True when it is not a regular file: a symlink, a device ...), sorted. Symlinks are reported,
    never followed; a missing folder gives []."""
    base = root / top
    if base.is_symlink() or (base.exists() and not base.is_dir()):
        return [(top, True)]
    out: list[tuple[str, bool]] = []
    for dirpath, dirnames, filenames in os.walk(base):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if not stat.S_ISDIR(st.st_mode):
                out.append((os.path.relpath(p, root).replace(os.sep, "/"), not stat.S_ISREG(st.st_mode)))
    return sorted(out)
