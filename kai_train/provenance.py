"""Provenance hooks of a training run (rank 0 only): run, genesis, checkpoint and release
statements appended to the run's chain.

The trainer calls these at the points where the facts exist; this module turns them into signed
statements and knows nothing of DeepSpeed. Subjects are bundle-relative paths under
`checkpoints/step-NNNNNN/`.

Checkpoints are written and hashed by every rank, each its own share (kai_train.checkpoint), off
the training critical path; `record_checkpoint` only hands the statement's facts to a background
thread, which waits for every rank's sidecar (file sha256s and tensor leaves), signs the folder in
the OpenSSF model-signing format with those digests and appends one statement naming every shard
file. It takes one checkpoint at a time, in step order, so statements keep their order and each
`parent_root` is the root recorded before it.
Run, genesis and release statements wait for it first. The release exports the last checkpoint
to `export/` (kai_train.export), signs that folder like a checkpoint folder and names every file of
it as a subject; `release.slsa.json` then states the release as signed SLSA Provenance v1 (attest.slsa). A worker error stops it; the next call
raises it as a ProvenanceError.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import os
import platform
import queue
import random
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attest import failpoints
from attest.chain import ChainWriter
from attest.digest import hash_safetensors, merkle_root, sha256_file, tree_digest
from attest.errors import KaiError
from attest.layout import CHAIN_NAME, EXPORT_DIR, EXPORT_LLAMA_DIR, checkpoint_dir
from attest.oms import SIGNATURE_NAME as OMS_SIGNATURE
from attest.oms import sign_checkpoint_dir
from attest.plugins import REPLAY_PLUGIN
from attest.signing import Signer
from attest.slsa import write_provenance
from attest.statements import subject
from kai_train.genesis import tensor_table

REPO_ROOT = Path(__file__).resolve().parent.parent
CODE_DIRS = ("attest", "data_pipelines", "kai_train")  # kai_train/conf/ included
LIBRARIES = ("torch", "deepspeed", "numpy", "pyarrow", "sentencepiece", "safetensors", "hydra-core", "cryptography")
# Checkpoints written but not yet recorded before `record_checkpoint` waits for the worker.
PENDING = 2
SHARE_TIMEOUT_S = 3600.0  # how long the worker waits for a rank's share of a checkpoint
RNG_DOMAIN = b"kai-rng/v1\n"


class ProvenanceError(KaiError, RuntimeError):
    """Recording a statement failed; the message names the checkpoint and the problem."""


def code_digest() -> str:
    """Digest of the training code and configs this run executes."""
    files = {
        str(p.relative_to(REPO_ROOT)): p
        for d in CODE_DIRS
        for p in (REPO_ROOT / d).rglob("*")
        if p.is_file() and p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts
    }
    return tree_digest(files)


def library_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = "absent"
    return out


def hardware(world_size: int) -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"machine": platform.machine(), "cpu_count": os.cpu_count(), "gpu": gpu, "world_size": world_size}


@functools.cache
def environment(world_size: int, attention: tuple[int, int, int, int] | None = None, bf16: bool = False
                ) -> dict[str, Any]:
    """Library versions, hardware and determinism settings of this process, recorded with each checkpoint
    (a run may be resumed elsewhere); `attention` (micro batch, heads, decoder rows, head dim) adds the
    SDPA kernel chosen for the model's shapes."""
    from kai_train.determinism import record

    det = record(attention, torch.bfloat16 if bf16 else torch.float32)
    return {"versions": library_versions(), "hardware": hardware(world_size), "determinism": det}


def rng_state_digest() -> tuple[list[str], str]:
    """(sources, sha256) of this process's RNG states: torch CPU, CUDA (when initialized), numpy's
    and Python's global generators: everything a training step could draw from."""
    parts: list[tuple[str, bytes]] = [("torch_cpu", torch.get_rng_state().numpy().tobytes())]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        parts.append(("torch_cuda", b"".join(s.numpy().tobytes() for s in torch.cuda.get_rng_state_all())))
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    parts.append(("numpy", json.dumps([name, int(pos), int(has_gauss), float(gauss)]).encode() + keys.tobytes()))
    parts.append(("python", json.dumps(random.getstate()).encode()))
    h = hashlib.sha256(RNG_DOMAIN)
    for src, data in parts:
        h.update(f"{src}\t{len(data)}\n".encode())
        h.update(data)
    return [src for src, _ in parts], h.hexdigest()


def _blocking(method):
    """Add the method's wall time to `self.blocked`: time the training loop spends here."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.blocked += time.perf_counter() - t0

    return wrapper


@dataclass
class _Checkpoint:
    step: int
    world: int  # ranks that each write a share
    predicate: dict[str, Any]  # everything but the roots, which the worker computes
    optimizer: bool  # optimizer shards were written


def _merged(shares: list[dict[str, Any]]) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """Every rank's file sha256s, weight leaves and optimizer leaves, as one checkpoint's."""
    digests: dict[str, str] = {}
    leaves: dict[str, str] = {}
    opt_leaves: dict[str, str] = {}
    for sh in shares:
        digests.update(sh["files"])
        leaves.update(sh["leaves"])
        opt_leaves.update(sh["optimizer_leaves"])
    return digests, leaves, opt_leaves


class Provenance:
    def __init__(self, run_dir: Path, signer: Signer, run_id: str, oms: bool = True, background: bool = True) -> None:
        self.run_dir = run_dir
        self.background = background
        self.chain = ChainWriter(run_dir / CHAIN_NAME, signer, run_id)
        # OpenSSF model-signing signature in each checkpoint folder (key back-ends; keyless has its own bundle)
        self.oms = oms and not hasattr(signer, "sign_statement")
        self.last_root: str | None = None
        self.last_step = 0
        self.blocked = 0.0  # seconds the training loop spent here: writing files, waiting for the worker
        self.checkpoint_blocked: list[float] = []  # of which, per record_checkpoint call
        self.worker_seconds = 0.0  # seconds spent hashing, signing and appending checkpoints
        self._recorded: collections.deque[tuple[int, str]] = collections.deque()
        self._error: ProvenanceError | None = None
        self._jobs: queue.Queue[_Checkpoint | None] = queue.Queue(maxsize=PENDING)
        self._worker: threading.Thread | None = None
        if background:
            self._worker = threading.Thread(target=self._work, name="kai-provenance", daemon=True)
            self._worker.start()

    # --- the training loop's side -------------------------------------------------------------

    def resume_from(self, step: int, weights_root: str) -> None:
        """A resumed run: the next checkpoint's parent is the signed state it continues from."""
        self.last_root, self.last_step = weights_root, step

    def check(self) -> None:
        """Raise the worker's error, if it had one."""
        if self._error is not None:
            raise self._error

    def recorded(self) -> list[tuple[int, str]]:
        """(step, root) of the checkpoints recorded since the last call."""
        out = []
        while self._recorded:
            out.append(self._recorded.popleft())
        return out

    def _wait(self) -> None:
        if self._worker is not None:
            self._jobs.join()
        self.check()

    @_blocking
    def flush(self) -> None:
        """Wait until every checkpoint handed over is in the chain; raise a worker error."""
        self._wait()

    def close(self) -> None:
        """Flush, then stop the worker."""
        self.flush()
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join()
            self._worker = None

    @_blocking
    def record_run(self, config: dict[str, Any], config_file: str, world_size: int) -> None:
        self._wait()
        self.chain.append(
            "run",
            [subject(config_file, sha256_file(self.run_dir / config_file))],
            {"config": config, "code_digest": code_digest(), "versions": library_versions(), "hardware": hardware(world_size),
             "replay_plugin": REPLAY_PLUGIN},
        )

    @_blocking
    def record_genesis(self, world: int, recipe: dict[str, Any], rules: dict[str, str],
                       shapes: Mapping[str, tuple[int, ...]]) -> str:
        """Recorded before step 1 (not in the background), once every rank's share of the initial
        weights is written and hashed (kai_train.checkpoint.write_share at step 0)."""
        self._wait()
        digests, leaves, _ = _merged(self._shares(0, world))
        root = merkle_root(leaves)
        subs = self._signed_subjects(0, digests)
        self.chain.append("genesis", subs, {"recipe": recipe, "weights_root": root,
                                            "tensors": tensor_table(shapes, leaves, rules)})
        self.last_root = root
        return root

    @_blocking
    def record_checkpoint(self, step: int, world: int, data_consumed: dict[str, Any], metrics: dict[str, Any],
                          optimizer: bool = True, extra: dict[str, Any] | None = None) -> None:
        """Hand the checkpoint's statement to the worker, which records it once every rank's share is
        written (waiting here only while PENDING earlier checkpoints are still unrecorded)."""
        t0 = time.perf_counter()
        self.check()
        pred = {"step": step, "data_consumed": data_consumed, "metrics": metrics, **(extra or {})}
        job = _Checkpoint(step, world, pred, optimizer)
        if self._worker is None:
            self._record_checkpoint(job)
        else:
            self._jobs.put(job)
        self.checkpoint_blocked.append(time.perf_counter() - t0)

    @_blocking
    def record_release(self) -> Path:
        """Export the last checkpoint to export/ (weights, config.json, tokenizer, the Llama folder
        export/llama/), sign that folder in the OpenSSF model-signing format (export/model.sig, key
        back-ends), then record the release: every file of export/ is a subject, and `text_export`
        names the transform of export/llama/ (None when the model has no Llama form). Returns the
        export folder."""
        from attest.llama import TRANSFORM
        from attest.release import EXPORT_FORMAT
        from kai_train.export import export

        self._wait()
        out = export(self.run_dir, self.last_step, self.run_dir / EXPORT_DIR)
        signed = self._last_checkpoint_files()
        digests: dict[str, str] = {}
        leaves: dict[str, str] = {}
        linked = 0
        for p in sorted(out.rglob("*")):
            rel = p.relative_to(out).as_posix()
            if p.is_symlink() or not (p.is_file() or p.is_dir()):
                raise ProvenanceError(f"{p}: not a regular file; the release signs every file of {EXPORT_DIR}/")
            if not p.is_file() or rel == OMS_SIGNATURE:
                continue
            st = p.stat()
            if (st.st_dev, st.st_ino) in signed:  # a hard link to a signed checkpoint shard: its digest is known
                digests[rel] = signed[(st.st_dev, st.st_ino)]
                linked += 1
            elif rel.endswith(".safetensors") and "/" not in rel:  # model.safetensors, or the shards of a sharded export
                digests[rel], lv = hash_safetensors(p)
                leaves.update(lv)
            else:
                digests[rel] = sha256_file(p)
        if not linked and merkle_root(leaves) != self.last_root:
            raise ProvenanceError(f"{out}: canonical digest of the exported weights differs from the last checkpoint's")
        if self.oms:
            sig = sign_checkpoint_dir(out, self.chain.signer, known=digests)
            digests[OMS_SIGNATURE] = sha256_file(sig)
        else:
            (out / OMS_SIGNATURE).unlink(missing_ok=True)  # an earlier signature would not list this export
        subjects = [subject(f"{EXPORT_DIR}/{rel}", sha) for rel, sha in sorted(digests.items())]
        text_export = TRANSFORM if (out / EXPORT_LLAMA_DIR).is_dir() else None
        self.chain.append("release", subjects, {"step": self.last_step, "weights_root": self.last_root,
                                                "export_format": EXPORT_FORMAT, "text_export": text_export})
        write_provenance(self.run_dir, self.chain.signer)  # release.slsa.json: the same facts as SLSA Provenance v1
        return out

    # --- files and the worker's side -----------------------------------------------------------

    def _last_checkpoint_files(self) -> dict[tuple[int, int], str]:
        """(device, inode) -> signed sha256 of the last checkpoint's files: an export that hard-links
        them (kai_train.export) is not read again, so no rank re-hashes the model at release."""
        from attest.chain import read_chain

        entries, _ = read_chain(self.chain.path)
        last = [e for e in entries if e.kind == "checkpoint"][-1:]
        out = {}
        for s in last[0].statement["subject"] if last else []:
            try:
                st = (self.run_dir / s["name"]).stat()
            except OSError:
                continue
            out[(st.st_dev, st.st_ino)] = s["digest"]["sha256"]
        return out

    def _signed_subjects(self, step: int, digests: dict[str, str]) -> list[dict[str, Any]]:
        """Subjects for the files of checkpoint folder `step` (name -> sha256), plus its OMS signature."""
        subjects = [subject(name, sha) for name, sha in sorted(digests.items())]
        if self.oms:
            folder = self.run_dir / checkpoint_dir(step)
            failpoints.reached("before-oms")
            known = {name.rsplit("/", 1)[1]: sha for name, sha in digests.items()}
            sig = sign_checkpoint_dir(folder, self.chain.signer, known=known)
            failpoints.reached("oms-signed")
            subjects.append(subject(str(sig.relative_to(self.run_dir)), sha256_file(sig)))
        return subjects

    def _shares(self, step: int, world: int) -> list[dict[str, Any]]:
        """Every rank's sidecar for checkpoint `step` (kai_train.checkpoint.write_share), waiting for them."""
        from kai_train.checkpoint import sidecar

        paths = [sidecar(self.run_dir, step, r) for r in range(world)]
        deadline = time.monotonic() + SHARE_TIMEOUT_S
        while not all(p.exists() for p in paths):
            if time.monotonic() > deadline:
                missing = [str(p) for p in paths if not p.exists()]
                raise ProvenanceError(f"checkpoint at step {step}: no share from {missing} after {SHARE_TIMEOUT_S:.0f} s")
            time.sleep(0.02)
        shares = [json.loads(p.read_text()) for p in paths]
        for r, sh in enumerate(shares):
            if sh.get("rank") != r or sh.get("world") != world:
                raise ProvenanceError(f"{paths[r]}: a share of rank {sh.get('rank')} of {sh.get('world')}, "
                                      f"expected rank {r} of {world}")
        return shares

    def _record_checkpoint(self, job: _Checkpoint) -> None:
        t0 = time.perf_counter()
        shares = self._shares(job.step, job.world)
        digests, leaves, opt_leaves = _merged(shares)
        failpoints.reached("checkpoint-hashed")
        subs = self._signed_subjects(job.step, digests)
        root = merkle_root(leaves)
        pred = {**job.predicate, "weights_root": root, "parent_root": self.last_root}
        if job.optimizer:
            steps = {sh["optimizer_step"] for sh in shares}
            if len(steps) != 1:
                raise ProvenanceError(f"checkpoint at step {job.step}: ranks report optimizer steps {sorted(map(str, steps))}")
            files = sorted(n for n in digests if n.rsplit("/", 1)[1].startswith("optimizer"))
            pred["optimizer"] = {"files": files, "step": steps.pop(), "root": merkle_root(opt_leaves)}
        self.chain.append("checkpoint", subs, pred)
        self.last_root, self.last_step = root, job.step
        self._recorded.append((job.step, root))
        self.worker_seconds += time.perf_counter() - t0

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if self._error is None:  # after a failure nothing more is appended: parent_root would lie
                    self._record_checkpoint(job)
            except Exception as e:  # noqa: BLE001 - any failure must reach the training loop
                self._error = ProvenanceError(f"checkpoint at step {job.step} not recorded: {type(e).__name__}: {e}")
            finally:
                self._jobs.task_done()
        self._jobs.task_done()
