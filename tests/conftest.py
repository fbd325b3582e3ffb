"""Shared fixtures: a real demo run (kai-data + torchrun with 2 CPU ranks + DeepSpeed), built once."""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from attest.chain import ChainWriter, read_chain
from attest.signing import PemSigner
from attest.layout import SLSA_NAME
from attest.slsa import write_provenance
from attest.statements import CHAIN_FIELDS

REPO = Path(__file__).resolve().parent.parent
# One math thread per process unless the caller sets a count: the models tests train in-process are
# tiny (one thread is as fast), and pytest workers, torchrun ranks and replays, one per core already,
# would otherwise each start a thread per core and spin against each other. Set before any test
# module imports torch; the subprocesses inherit it (`env` below keeps the same default).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Small but real: the demo corpus, 2 ranks, a few steps, two checkpoints.
TRAIN_ARGS = ["train.steps=4", "train.ckpt_every=2", "train.micro_batch=4", "train.log_every=1", "train.eval_every=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    e = dict(os.environ, DS_ACCELERATOR="cpu", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def run(cmd: list[str], timeout: int = 600, extra_env: dict[str, str] | None = None, cwd: Path = REPO,
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env={**env(), **(extra_env or {})}, text=True, capture_output=True,
                          timeout=timeout)


def kai_attest(*args: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "attest.cli", *args])


def verify_trusted(bundle: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`kai-attest verify` trusting the key the bundle carries (an honest run's own key): exit 0 means pass."""
    return kai_attest("verify", str(bundle), "--trust", str(bundle / "keys/signing-key.pub.pem"), *extra)


def kai_data(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "data_pipelines.build", f"out_dir={run_dir}", *overrides])


# Runs that tests compare with each other (same genesis for any rank count, a split run equal to a
# straight one) need one genesis: they fix the seed, since kai-train draws a fresh one by default.
FIXED_SEED = "seed=1234"


def with_seed(overrides: tuple[str, ...] | list[str]) -> list[str]:
    """`overrides` with the fixed seed added unless they name a seed (`seed=null` draws one)."""
    return list(overrides) if any(o.startswith("seed=") for o in overrides) else [FIXED_SEED, *overrides]


def torchrun(run_dir: Path, nproc: int, *overrides: str, extra_env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), "-m", "kai_train.train", f"run_dir={run_dir}", *with_seed(overrides)]
    return run(cmd, extra_env=extra_env)


def must(p: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert p.returncode == 0, f"exit {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-6000:]}"
    return p


def prepared_data(tmp: Path, template: Path | None = None) -> Path:
    """A run dir with a key, shards and tokenizer (copied from `template` when given)."""
    if template is not None:
        shutil.copytree(template, tmp, ignore=shutil.ignore_patterns("checkpoints", "ds", "bundle", "config"))
        # keep the data statements (and the key) but none of the training ones
        entries, _ = read_chain(tmp / "chain.jsonl")
        keep = [e.raw + b"\n" for e in entries if e.kind in ("data-shard", "tokenizer")]
        assert len(keep) == len(entries) or entries[len(keep)].kind not in ("data-shard", "tokenizer")
        (tmp / "chain.jsonl").write_bytes(b"".join(keep))
        return tmp
    must(kai_attest("keygen", str(tmp / "keys")))
    must(kai_data(tmp))
    return tmp


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder `build` fills once per test session: under pytest-xdist the workers share it (the
    first to ask builds it under a file lock, the others wait and read it), so a session-wide
    training runs once, not once per worker. Tests read it; what they change, they copy first."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    import fcntl

    shared = tmp_path_factory.getbasetemp().parent  # the session's base folder, above each worker's own
    folder = shared / name
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / f"{name}.built").exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed build of another worker left
            folder.mkdir()
            build(folder)
            (shared / f"{name}.built").touch()
    return folder


@pytest.fixture(scope="session")
def data_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Key + demo shards + tokenizer, signed into a chain; no training yet."""
    pytest.importorskip("hydra", reason="kai-data needs the train extra; not on the evaluator's light install")
    return built_once(tmp_path_factory, "data", lambda d: _prepare(d / "run")) / "run"


def _prepare(run_dir: Path) -> None:
    prepared_data(run_dir)


def _train_demo(folder: Path, data: Path) -> None:
    run_dir = prepared_data(folder / "run", data)
    # a JIT build folder of its own: the demo must train without compiling anything into it
    must(torchrun(run_dir, 2, "deepspeed=zero2", *TRAIN_ARGS,
                  extra_env={"TORCH_EXTENSIONS_DIR": str(folder / "torch_extensions")}))
    must(kai_attest("bundle", str(run_dir)))


@pytest.fixture(scope="session")
def demo_run(data_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo trained on 2 CPU ranks with DeepSpeed ZeRO-2, bundled."""
    return built_once(tmp_path_factory, "demo", lambda d: _train_demo(d, data_run)) / "run"


def resign(b: Path, key: Path, mutate: Callable[[list[dict]], None]) -> None:
    """An insider with the real key: rewrite the whole chain consistently after `mutate` edits the statements."""
    entries, _ = read_chain(b / "chain.jsonl")
    statements = [e.statement for e in entries]
    honest_card = card_of(b, entries[:-1]) if entries and entries[-1].kind == "release" else None
    mutate(statements)
    run_id = statements[0]["predicate"]["run_id"]
    (b / "chain.jsonl").unlink()
    w = ChainWriter(b / "chain.jsonl", PemSigner.from_file(key), run_id)
    for st in statements:
        if st["predicate"]["kind"] == "release" and st is statements[-1]:
            refresh_card(b, key, st, honest_card)
        w.append(st["predicate"]["kind"], st["subject"], {k: v for k, v in st["predicate"].items() if k not in CHAIN_FIELDS})
    if (b / SLSA_NAME).is_file() and statements and statements[-1]["predicate"]["kind"] == "release":
        write_provenance(b, PemSigner.from_file(key))  # the release's SLSA provenance, re-signed with it


def card_of(b: Path, entries: list) -> bytes | None:
    """The model card attest.release renders from `entries` (the chain before the release)."""
    from attest.release import model_card

    ckpts = [e for e in entries if e.kind == "checkpoint"]
    genesis = next((e.predicate for e in entries if e.kind == "genesis"), None)
    run = next((e.predicate for e in entries if e.kind == "run"), None)
    if not ckpts or genesis is None or run is None:
        return None
    last = ckpts[-1].predicate
    return model_card(entries, last["step"], last["weights_root"], genesis["recipe"]["model"], run["config"],
                      genesis, (b / "export/llama").is_dir()).encode()


def refresh_card(b: Path, key: Path, release: dict, honest: bytes | None) -> None:
    """The model card names the chain head before the release: after re-signing the chain, the insider
    renders an honest card again (attest.release; an edited one stays as the test made it), signs
    export/ again (model-signing) and names the new digests."""
    from attest.digest import sha256_file
    from attest.oms import sign_checkpoint_dir
    from attest.release import CARD_NAME

    card = b / "export" / CARD_NAME
    if not card.is_file():
        return
    if honest is not None and card.read_bytes() == honest:
        entries, _ = read_chain(b / "chain.jsonl")
        card.write_bytes(card_of(b, entries) or honest)
    if (b / "export/model.sig").is_file():
        sign_checkpoint_dir(b / "export", key)
    for s in release["subject"]:
        if s["name"] in ("export/README.md", "export/model.sig"):
            s["digest"]["sha256"] = sha256_file(b / s["name"])


# The head of a script (run as `python -c SCRIPT FOLDER`) that records, under a Python audit hook,
# every file below FOLDER the code after it opens; it ends with `print(json.dumps(sorted(opened)))`.
RECORD_OPENS = r"""
import json, os, sys
folder = os.path.realpath(sys.argv[1])
opened = set()
def hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        p = os.path.realpath(os.fsdecode(args[0]))
        if p.startswith(folder + os.sep):
            opened.add(os.path.relpath(p, folder))
sys.addaudithook(hook)
"""


@contextlib.contextmanager
def serve_tsa(answer: Callable[[bytes], bytes]) -> Iterator[str]:
    """An RFC 3161 TSA over HTTP on 127.0.0.1 that replies `answer(query)`; yields its URL."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            reply = answer(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.send_header("Content-Type", "application/timestamp-reply")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/tsa"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def bundle(demo_run: Path, tmp_path: Path) -> Path:
    """A copy of the demo's bundle to tamper with (test files with other bundles define their own)."""
    return Path(shutil.copytree(demo_run / "bundle", tmp_path / "bundle"))


@pytest.fixture
def key(demo_run: Path) -> Path:
    """The demo run's signing key: what an insider holds."""
    return demo_run / "keys/signing-key.pem"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that reads the trained demo (directly or through `bundle`/`key`) runs torchrun: slow.
    The files with slow tests run first (whole, in file order otherwise): under pytest-xdist the
    quick files then fill in at the end, and no worker waits alone on a long test started last."""
    for item in items:
        if "demo_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    slow_files = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow_files)
