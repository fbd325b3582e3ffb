"""A mutation fuzzer over every `kai-attest` entry point, with a resource watchdog.

Seeds are real inputs: a synthetic bundle (tests/bundlefactory.py, real signatures and safetensors),
the golden v1 bundle's chain lines (tests/golden/v1), the example policy, a challenge drawn on the
bundle and the packs answering it, a VSA written by `verify --vsa`, and safetensors references for
`lineage`. Each input mutates one seed (bytes flipped, cut, grown; a JSON value replaced anywhere,
re-signed with the bundle's key so the checks, not only the parsers, see it; the file replaced by a
FIFO, a device, a symlink out of the bundle, a sparse giant, a folder; a path component of 300
bytes) and runs one entry point in-process through `attest.cli.main`.

The watchdog judges every input:
- the command returns (exit 0-4) or ends in exactly one `kai-attest: error:` line (exit 2), never a
  traceback and never "internal error" (that names a bug; the input is kept for reproduction);
- `verify` prints its verdict as the last line;
- it ends within `wall_s` (an interval timer raises `Hang`, a BaseException no catch-all takes);
- the process's peak RSS stays under `max_rss` (resource.getrusage, checked after each input);
- nothing is created outside the verifier's scratch: the temp folder the harness points TMPDIR at
  and the working folder are empty again after each input (outputs go to a folder it clears).

`run(n, seed)` returns a `Tally`; tests/test_fuzz.py runs a short campaign and bench/fuzz_entrypoints.py
a long one.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import random
import resource
import shutil
import signal
import struct
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from bundlefactory import DERIVER, make_bundle, statements, write_chain, write_safetensors

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "v1"


class Hang(BaseException):
    """Raised by the watchdog's timer inside a command that ran past its wall-time bound."""


@dataclass
class Tally:
    inputs: int = 0
    seconds: float = 0.0
    by_entry: Counter = field(default_factory=Counter)
    by_exit: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    max_rss_mib: float = 0.0
    slowest: tuple[float, str] = (0.0, "")

    def line(self) -> str:
        rate = self.inputs / self.seconds if self.seconds else 0.0
        return (f"fuzz: {self.inputs} inputs in {self.seconds:.1f} s ({rate:.1f}/s), peak RSS {self.max_rss_mib:.0f} MiB, "
                f"slowest {self.slowest[0]:.2f} s ({self.slowest[1]}), exits {dict(sorted(self.by_exit.items()))}, "
                f"entry points {dict(sorted(self.by_entry.items()))}, problems {len(self.problems)}")


# ---------------------------------------------------------------- mutations


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _set(obj: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    obj[path[0]] = _set(obj[path[0]], path[1:], value)
    return obj


def json_value(rng: random.Random, depth: int = 0) -> Any:
    """A hostile JSON value: huge and negative numbers, long and odd strings, odd containers."""
    r = rng.random()
    if r < 0.25 or depth > 2:
        return rng.choice([0, -1, 1, -2**63, 2**64 - 1, 10**7, 10**18, -10**9, 2**40, 0.5, -0.0, 1e308, 1e-300,
                           True, False, None])
    if r < 0.5:
        return rng.choice(["", "x" * rng.choice([1, 300, 3000, 70000] if depth == 0 else [1, 300]), "../../etc/passwd", "/dev/zero", "a/" * 80,
                           "chain.jsonl/model.sig", "\x1b[31m", "\u202e", "n" * 300 + "/x", "export/model.safetensors",
                           "sha256:" + "0" * 64, "0" * 64, "cosine", "wsd", "NaN"])
    if r < 0.75:
        return [json_value(rng, depth + 1) for _ in range(rng.choice([0, 1, 2, 5, 5000]) if depth == 0 else 2)]
    return {rng.choice(["name", "digest", "sha256", "step", "segment", "kind", "x", ""]): json_value(rng, depth + 1)
            for _ in range(rng.randint(0, 3))}


def mutate_json(doc: Any, rng: random.Random) -> Any:
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, 3)):
        paths = _paths(doc)
        path = rng.choice(paths)
        if path and rng.random() < 0.2:
            parent = doc
            for p in path[:-1]:
                parent = parent[p]
            if isinstance(parent, dict):
                del parent[path[-1]]
                continue
            if isinstance(parent, list):
                parent.append(copy.deepcopy(parent[path[-1]]))  # a duplicate entry
                continue
        doc = _set(doc, path, json_value(rng))
    return doc


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(["flip", "cut", "insert", "dup", "zero", "extend"])
        i = rng.randrange(len(b) + 1)
        if op == "flip" and b:
            b[min(i, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == "cut":
            del b[i:i + rng.choice([1, 8, 100, 10**6])]
        elif op == "insert":
            b[i:i] = rng.choice([b"\x00", b"\n", b"{", b"[" * 100, b'"', b"9" * 30, b"\xff\xfe", b"\\ud800"])
        elif op == "dup":
            b[i:i] = b[i:i + rng.choice([10, 1000])]
        elif op == "zero":
            b[i:i + 64] = bytes(len(b[i:i + 64]))
        elif op == "extend":
            b += bytes(rng.choice([1, 4096]))
    return bytes(b)


SPECIALS = ("fifo", "dev-zero", "symlink-out", "dir", "sparse", "empty")


def make_special(path: Path, kind: str, outside: Path) -> None:
    """Replace `path` by something hostile that is not ordinary file content."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "symlink-out":
        path.symlink_to(outside)
    elif kind == "dir":
        path.mkdir()
    elif kind == "sparse":  # above the default limits: refused before a byte is read
        with open(path, "wb") as f:
            f.truncate(100 << 30)
    elif kind == "empty":
        path.write_bytes(b"")


# ---------------------------------------------------------------- the campaign


class Harness:
    """Seeds in a private folder; `one(rng)` runs one mutated input through one entry point."""

    ENTRIES = ("verify-file", "verify-statement", "verify-policy", "verify-challenge", "challenge", "respond",
               "check-vsa", "lineage", "bundle", "verify-archive")

    def __init__(self, workdir: Path, wall_s: float = 60.0, max_rss_mib: float = 2048.0) -> None:
        import attest.verify as verify
        from attest.cli import main

        self.main = main
        self.wall_s, self.max_rss_mib = wall_s, max_rss_mib
        verify.DERIVERS[DERIVER] = "bundlefactory"
        self.dir = workdir
        self.tmp = workdir / "tmp"  # TMPDIR while fuzzing: must be empty after every input
        self.out = workdir / "out"  # where commands write (cleared after every input)
        self.cwd = workdir / "cwd"  # the working folder: must stay empty
        for d in (self.tmp, self.out, self.cwd):
            d.mkdir(parents=True, exist_ok=True)
        self.seed_root, self.key = make_bundle(workdir / "seed" / "bundle", steps=(2, 4))
        self.bundle = workdir / "bundle"
        self.touched: set[str] = set()
        shutil.copytree(self.seed_root, self.bundle, symlinks=True)
        self.outside = workdir / "outside.json"
        self.outside.write_text('{"outside": true}')
        self.statements = statements(self.seed_root)
        self.policy = json.loads((REPO / "docs" / "policy.example.json").read_text())
        self.golden_lines = (GOLDEN / "chain.jsonl").read_bytes().split(b"\n")[:-1] if GOLDEN.is_dir() else []
        self.pub = str(self.seed_root / "keys" / "signing-key.pub.pem")
        # a challenge, its packs and a VSA, written by the commands themselves
        self.challenge = workdir / "seed" / "challenge.json"
        self._quiet(["challenge", str(self.seed_root), "--segments", "2", "--seed", "5", "--out", str(self.challenge)])
        self.packs = workdir / "seed" / "packs"
        self._quiet(["respond", str(self.seed_root), str(self.challenge), "--out", str(self.packs)])
        self.vsa = workdir / "seed" / "vsa.json"
        self._quiet(["verify", str(self.seed_root), "--vsa", str(self.vsa), "--sign-key", str(self.key)])
        self.reference = self.seed_root / "export" / "model.safetensors"
        self.files = sorted(p.relative_to(self.seed_root).as_posix() for p in self.seed_root.rglob("*") if p.is_file())

    def _quiet(self, args: list[str]) -> int:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return self.main(args)

    # --- inputs: each returns (argv, label, verify-like: the verdict must be the last line)

    def _restore_bundle(self) -> None:
        """Put back the files the last input touched (copying the whole bundle costs more than a verify)."""
        for name in self.touched:
            p = self.bundle / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
            if (self.seed_root / name).is_file():
                shutil.copy2(self.seed_root / name, p)
        self.touched.clear()

    def _verify_file(self, rng: random.Random) -> tuple[list[str], str, bool]:
        name = rng.choice(self.files + ["release.slsa.json", "export/extra.bin", "keys/x.pub.pem"])
        self.touched.add(name)
        p = self.bundle / name
        if rng.random() < 0.3:
            kind = rng.choice(SPECIALS)
            make_special(p, kind, self.outside)
            label = f"{name} -> {kind}"
        else:
            data = (self.seed_root / name).read_bytes() if (self.seed_root / name).is_file() else b"{}"
            if name == "chain.jsonl" and self.golden_lines and rng.random() < 0.3:
                data = b"\n".join(rng.sample(self.golden_lines, min(2, len(self.golden_lines)))) + b"\n"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(mutate_bytes(data, rng))
            label = f"{name} bytes"
        return ["verify", str(self.bundle), *(["--trust", self.pub] if rng.random() < 0.5 else [])], label, True

    def _verify_statement(self, rng: random.Random) -> tuple[list[str], str, bool]:
        sts = copy.deepcopy(self.statements)
        i = rng.randrange(len(sts))
        sts[i] = mutate_json(sts[i], rng)
        if not isinstance(sts[i], dict):
            sts[i] = {"predicate": sts[i]}
        if rng.random() < 0.2:  # many entries, or a huge span of steps
            ck = [s for s in sts if isinstance(s.get("predicate"), dict) and s["predicate"].get("kind") == "checkpoint"]
            for j, s in enumerate(ck):
                s["predicate"]["step"] = 1 if j % 2 == 0 else 10**7
        self.touched.add("chain.jsonl")
        write_chain(self.bundle, self.key, sts, relink=rng.random() < 0.8)
        return ["verify", str(self.bundle), "--trust", self.pub], f"statement {i}", True

    def _verify_policy(self, rng: random.Random) -> tuple[list[str], str, bool]:
        pol = mutate_json(self.policy, rng)
        if isinstance(pol, dict) and rng.random() < 0.5:
            key = rng.choice(["tsa_roots", "tsa_intermediates", "keys", "sigstore_trusted_root"])
            target = rng.choice(["/dev/zero", "/dev/urandom", str(self.dir / "fifo"), str(self.dir), "n" * 300,
                                 str(self.outside), self.pub])
            pol[key] = target if key == "sigstore_trusted_root" else [target]
        path = self.out / rng.choice(["p.json", "p.yaml"])
        path.write_text(json.dumps(pol))
        return ["verify", str(self.seed_root), "--policy", str(path)], "policy", True

    def _verify_challenge(self, rng: random.Random) -> tuple[list[str], str, bool]:
        c = json.loads(self.challenge.read_text())
        if rng.random() < 0.7:
            c = mutate_json(c, rng)
        path = self.out / "c.json"
        path.write_text(json.dumps(c))
        packs = self.out / "packs"
        shutil.copytree(self.packs, packs, symlinks=True)
        victims = sorted(p for p in packs.rglob("*") if p.is_file())
        if victims and rng.random() < 0.6:
            v = rng.choice(victims)
            if rng.random() < 0.5:
                make_special(v, rng.choice(SPECIALS), self.outside)
            else:
                v.write_bytes(mutate_bytes(v.read_bytes(), rng))
        return ["verify", str(self.seed_root), "--challenge", str(path), "--packs", str(packs)], "challenge+packs", True

    def _challenge(self, rng: random.Random) -> tuple[list[str], str, bool]:
        self._verify_statement(rng)
        return (["challenge", str(self.bundle), "--segments", str(rng.choice([1, 2, 0, -1, 10**9])), "--seed", "1",
                 "--out", str(self.out / "c.json")], "challenge", False)

    def _respond(self, rng: random.Random) -> tuple[list[str], str, bool]:
        c = mutate_json(json.loads(self.challenge.read_text()), rng) if rng.random() < 0.8 else {}
        path = self.out / "c.json"
        path.write_text(json.dumps(c))
        return ["respond", str(self.seed_root), str(path), "--out", str(self.out / "packs")], "respond", False

    def _check_vsa(self, rng: random.Random) -> tuple[list[str], str, bool]:
        path = self.out / "vsa.json"
        raw = self.vsa.read_bytes()
        if rng.random() < 0.5:
            doc = json.loads(raw)
            env = doc.get("dsseEnvelope", {})
            if rng.random() < 0.5 and isinstance(env, dict) and "payload" in env:
                import base64

                st = json.loads(base64.b64decode(env["payload"]))
                env["payload"] = base64.b64encode(json.dumps(mutate_json(st, rng)).encode()).decode()
            else:
                doc = mutate_json(doc, rng)
            path.write_text(json.dumps(doc))
        elif rng.random() < 0.5:
            path.write_bytes(mutate_bytes(raw, rng))
        else:
            make_special(path, rng.choice(SPECIALS), self.outside)
        key = self.pub if rng.random() < 0.9 else rng.choice(["/dev/zero", str(self.dir / "fifo"), str(self.outside)])
        artifact = str(self.seed_root) if rng.random() < 0.8 else rng.choice([str(self.bundle), "/dev/zero", str(self.out)])
        return ["check-vsa", str(path), artifact, "--key", key], "check-vsa", False

    def _lineage(self, rng: random.Random) -> tuple[list[str], str, bool]:
        path = self.out / "ref.safetensors"
        r = rng.random()
        if r < 0.4:
            path.write_bytes(mutate_bytes(self.reference.read_bytes(), rng))
        elif r < 0.7:
            shape = rng.choice([(0, 32), (32, 32), (1 << 17, 1), (64, 32), (2,), ()])
            fill = rng.choice([np.nan, np.inf, 0.0, 1.0, None])
            arr = np.random.default_rng(rng.randrange(1 << 30)).normal(size=shape).astype(np.float32) if fill is None \
                else np.full(shape, fill, np.float32)
            write_safetensors(path, {rng.choice(["text.emb", "text.layers.0.mlp.w1.weight", "vision.patch"]): arr})
        elif r < 0.85:
            hdr = mutate_json({"text.emb": {"dtype": "F32", "shape": [64, 32], "data_offsets": [0, 8192]}}, rng)
            raw = json.dumps(hdr).encode()
            path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8192))
        else:
            make_special(path, rng.choice(SPECIALS), self.outside)
        cand = str(self.seed_root) if rng.random() < 0.3 else str(self.reference)
        if rng.random() < 0.3:
            self._verify_statement(rng)
            cand = str(self.bundle)
        if path.is_file() and not path.is_symlink() and rng.random() < 0.2:
            # the reference named in a registry (mutated or not), its file at ROOT/ref/
            (self.out / "ref").mkdir(exist_ok=True)
            os.replace(path, self.out / "ref" / "model.safetensors")
            digest = hashlib.sha256((self.out / "ref" / "model.safetensors").read_bytes()).hexdigest()
            entry = {"name": "ref", "layout": rng.choice(["auto", "qwen2", "kai"]), "source": "fuzz",
                     "files": [{"path": "model.safetensors", "sha256": digest}]}
            doc = {"format": "kai-lineage-registry/v1", "references": [entry]}
            reg = self.out / "registry.json"
            reg.write_text(json.dumps(mutate_json(doc, rng) if rng.random() < 0.7 else doc))
            return ["lineage", cand, "--registry", str(reg), "--reference-name", "ref", "--null-draws", "9"], \
                "lineage", False
        return ["lineage", cand, "--reference", str(path), "--null-draws", "9"], "lineage", False

    def _bundle(self, rng: random.Random) -> tuple[list[str], str, bool]:
        """The team's own command on its own run folder: statements and bytes mutated, no giant files."""
        if rng.random() < 0.5:
            self._verify_statement(rng)
        else:
            name = rng.choice(self.files)
            self.touched.add(name)
            (self.bundle / name).write_bytes(mutate_bytes((self.seed_root / name).read_bytes(), rng))
        return ["bundle", str(self.bundle), "--out", str(self.out / "b"), *(["--light"] if rng.random() < 0.5 else [])], \
            "bundle", False

    def _verify_archive(self, rng: random.Random) -> tuple[list[str], str, bool]:
        import tarfile

        path = self.out / rng.choice(["b.tar", "b.tar.gz"])
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz" if path.name.endswith("gz") else "w") as tar:
            tar.add(self.seed_root, arcname="bundle")
        path.write_bytes(mutate_bytes(buf.getvalue(), rng) if rng.random() < 0.8 else buf.getvalue())
        return ["verify", str(path)], "archive", True

    # --- one input under the watchdog

    def replay(self, input_seed: int, entry: str | None = None) -> tuple[str, int, float, str | None]:
        """Run one input again by its seed (as printed with a problem), for a debugger."""
        return self.one(random.Random(input_seed), entry)

    def one(self, rng: random.Random, entry: str | None = None) -> tuple[str, int, float, str | None]:
        entry = entry or rng.choice(self.ENTRIES)
        make: Callable[[random.Random], tuple[list[str], str, bool]] = getattr(self, "_" + entry.replace("-", "_"))
        entry_point = entry if entry in ("challenge", "respond", "check-vsa", "lineage", "bundle") else "verify"
        fifo = self.dir / "fifo"
        if not fifo.exists():
            os.mkfifo(fifo)
        argv, label, verdict_last = make(rng)
        out, err = io.StringIO(), io.StringIO()
        problem = None
        t = time.monotonic()
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, self.wall_s)
        cwd = os.getcwd()
        try:
            os.chdir(self.cwd)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = self.main(argv)
        except Hang:
            rc, problem = -1, f"no verdict within {self.wall_s} s"
        except SystemExit as e:  # argparse usage errors
            rc = e.code if isinstance(e.code, int) else 2
        except BaseException as e:  # noqa: BLE001 - a traceback: what the harness looks for
            import traceback

            where = traceback.extract_tb(e.__traceback__)[-1]
            rc, problem = -2, f"escaped {type(e).__name__}: {str(e)[:300]} at {where.filename}:{where.lineno}"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
            os.chdir(cwd)
        took = time.monotonic() - t
        o, e = out.getvalue(), err.getvalue()
        if problem is None:
            problem = self._judge(rc, o, e, verdict_last and "--json" not in argv)
        leaked = self._leaks()
        if leaked and problem is None:
            problem = f"created outside the scratch folder: {leaked[:3]}"
        self._restore_bundle()
        shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir()
        return entry_point, rc, took, None if problem is None else f"{entry} [{label}] {argv[1:]}: {problem}"

    @staticmethod
    def _judge(rc: int, out: str, err: str, verdict_last: bool) -> str | None:
        if "Traceback" in err or "internal error" in err:
            return "error line: " + err.strip()[-500:]
        if rc not in (0, 1, 2, 3, 4):
            return f"exit {rc}"
        if rc == 2:
            lines = err.strip().splitlines()
            usage = lines and lines[0].startswith("usage:")
            if not usage and (len(lines) != 1 or not lines[0].startswith("kai-attest: error: ")):
                return f"exit 2 with {len(lines)} error lines: {err.strip()[:300]}"
        elif verdict_last:
            last = out.strip().splitlines()[-1:] or [""]
            if not last[0].startswith("verdict: "):
                return f"last line is not the verdict: {last[0][:200]!r}"
        return None

    def _leaks(self) -> list[str]:
        return [p.name for d in (self.tmp, self.cwd) for p in d.iterdir()]


def _alarm(signum: int, frame: Any) -> None:
    raise Hang()


@contextlib.contextmanager
def pointed_tmp(tmp: Path) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in ("TMPDIR", "TEMP", "TMP")}
    saved_tempdir = tempfile.tempdir
    for k in saved:
        os.environ[k] = str(tmp)
    tempfile.tempdir = str(tmp)
    try:
        yield
    finally:
        tempfile.tempdir = saved_tempdir
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(n: int, seed: int = 0, workdir: Path | None = None, wall_s: float = 60.0, max_rss_mib: float = 2048.0,
        entries: tuple[str, ...] | None = None, progress: Callable[[Tally], None] | None = None,
        max_seconds: float | None = None) -> Tally:
    """Run `n` inputs (or until `max_seconds`); the Tally lists every problem found."""
    own = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="kai-fuzz-")) if own else workdir
    tally = Tally()
    try:
        h = Harness(wd, wall_s, max_rss_mib)
        rng = random.Random(seed)
        t0 = time.monotonic()
        with pointed_tmp(h.tmp):
            for i in range(n):
                entry = rng.choice(entries) if entries else None
                input_seed = rng.randrange(1 << 62)
                ep, rc, took, problem = h.one(random.Random(input_seed), entry)
                if problem:
                    problem = f"input {input_seed}: {problem}"
                tally.inputs += 1
                tally.by_entry[ep] += 1
                tally.by_exit[rc] += 1
                if took > tally.slowest[0]:
                    tally.slowest = (took, ep)
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                tally.max_rss_mib = max(tally.max_rss_mib, rss)
                if rss > max_rss_mib:
                    problem = problem or f"peak RSS {rss:.0f} MiB over {max_rss_mib:.0f} MiB"
                if problem:
                    tally.problems.append(problem)
                tally.seconds = time.monotonic() - t0
                if progress is not None and (i + 1) % 100 == 0:
                    progress(tally)
                if max_seconds is not None and tally.seconds > max_seconds:
                    break
    finally:
        if own:
            shutil.rmtree(wd, ignore_errors=True)
    return tally
