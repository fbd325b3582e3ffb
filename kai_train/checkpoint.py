"""Sharded, signed checkpoints: every rank writes and hashes its share; the signed state is the state
training continues from.

Layout of one checkpoint (docs/bundle-format.md, the `checkpoint` statement):

    checkpoints/step-NNNNNN/model-RRRRR-of-WWWWW.safetensors      float32 master weights of rank R's tensors
    checkpoints/step-NNNNNN/optimizer-RRRRR-of-WWWWW.safetensors  their AdamW moments (exp_avg/…, exp_avg_sq/…)

Each tensor has one owner rank (`assign`: whole tensors, balanced by bytes, a pure function of the
names, shapes and world size), so each rank holds, writes and hashes about 1/world of the state
(plus one tensor, transiently, while it assembles it from the pieces the other ranks send it). A tensor's leaf digest does
not depend on which file holds it, so the canonical root is the same at any world size and ZeRO
stage. Rank R reports its files' sha256 and leaves in a small sidecar
(`.provenance/step-NNNNNN/rank-RRRRR.json`, written last and atomically); rank 0's provenance worker
signs the checkpoint once every rank's sidecar is there. DeepSpeed's own checkpoint is not written:
resume (and replay) load these files (`SignedTensors`, `restore`), so the one copy stored is the
signed one: 12 bytes per parameter (4 for the weights, 8 for the two moments).
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from attest import failpoints, layout
from attest.digest import hash_safetensors
from attest.errors import KaiError
from kai_train.weights import save_weights

def sidecar(run_dir: Path, step: int, rank: int) -> Path:
    return run_dir / layout.sidecar(step, rank)


def assign(sizes: Mapping[str, int], world: int, holders: Mapping[str, list[int]] | None = None) -> dict[str, int]:
    """Owner rank of each tensor: largest first, each to the least-loaded rank (ties: lowest rank)
    among the ranks that hold it (`holders`; every rank by default: under expert parallelism an
    expert's tensors are held by some ranks only, kai_train.expert_parallel.holders).
    Deterministic, so every rank computes the same map without communicating."""
    load = [0] * world
    owner: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = min(holders[name] if holders is not None else range(world), key=lambda i: (load[i], i))
        owner[name] = r
        load[r] += sizes[name]
    return owner


def collect_share(engine, rank: int, world: int, with_optimizer: bool
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int | None]:
    """This rank's share of the float32 master weights and AdamW moments, as CPU tensors.

    Every rank calls it and walks the parameters in the same (sorted) order. Each tensor's owner
    assembles it from the pieces the ZeRO partitions hold (`_layout`): every other rank holding a
    piece sends it to the owner alone (point to point), so a rank sends about 1/world of the state
    per checkpoint and receives its own share, not the whole model as an all-reduce per tensor
    would make it. Peak memory per rank: its share plus one tensor being assembled."""
    from kai_train.engine import _link_optimizer_state

    params = dict(sorted(engine.module.named_parameters()))
    if with_optimizer:
        _link_optimizer_state(engine)
    owner, layout = _layout(engine, params, world)
    weights: dict[str, torch.Tensor] = {}
    moments: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        for key in (None, "exp_avg", "exp_avg_sq") if with_optimizer else (None,):
            full = _assemble(p, key, layout[name], owner[name], rank)
            if full is not None:
                (weights if key is None else moments)[name if key is None else f"{key}/{name}"] = full
    opt_step = None
    if with_optimizer:
        steps = {int(s["step"]) for s in engine.optimizer.optimizer.state.values() if "step" in s}
        if len(steps) > 1:
            raise RuntimeError(f"optimizer parameter groups disagree on the step count: {sorted(steps)}")
        opt_step = steps.pop() if steps else 0
    return weights, moments, opt_step


def _local_piece(p: torch.nn.Parameter) -> tuple[int, int]:
    """(start, numel) of the flat fp32 master tensor that this rank's ZeRO 1/2 partition holds (numel 0: none)."""
    mapping = getattr(p, "_hp_mapping", None)  # a fragment of the flat parameter, or none
    if mapping is None:
        return 0, 0
    return int(mapping.lp_fragment_address.start), int(mapping.lp_fragment_address.numel)


def _piece_data(p: torch.nn.Parameter, key: str | None, numel: int) -> torch.Tensor:
    """This rank's piece of the parameter's fp32 master copy (`key` None) or of an AdamW moment."""
    if hasattr(p, "ds_tensor"):
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        local = safe_get_local_fp32_param(p) if key is None else safe_get_local_optimizer_state(p, key)
        return local.reshape(-1)[:numel]
    return p._hp_mapping.get_hp_fragment(key).reshape(-1)  # type: ignore[union-attr]


def _layout(engine, params: Mapping[str, torch.nn.Parameter], world: int
            ) -> tuple[dict[str, int], dict[str, dict[int, tuple[int, int]]]]:
    """Each tensor's owner rank, and for every parameter this rank holds, the ranks holding a piece
    of it: {rank: (start, numel)}. Both are fixed for the engine's life, so they are computed once
    per engine. ZeRO-3 pieces follow from the partition size (every rank holds one of every
    tensor); ZeRO 1/2 pieces, a few per rank, are exchanged in one gather of small tuples."""
    import torch.distributed as dist

    from kai_train import expert_parallel

    cached = getattr(engine, "_kai_layout", None)
    if cached is not None:
        return cached
    ep = expert_parallel.of(engine.module)
    if ep > 1:  # this rank holds some experts only: owners come from every tensor of the model
        from kai_train.engine import canonical_shapes

        cfg = engine.module.cfg
        sizes = {n: math.prod(s) for n, s in canonical_shapes(cfg).items()}
        owner = assign(sizes, world, {n: expert_parallel.holders(n, cfg, ep, world) for n in sizes})
    else:
        owner = assign({n: p.ds_numel if hasattr(p, "ds_numel") else p.numel() for n, p in params.items()}, world)
    out: dict[str, dict[int, tuple[int, int]]] = {}
    for name, p in params.items():
        if hasattr(p, "ds_tensor"):
            size, group = p.ds_tensor.numel(), p.ds_process_group
            for i, r in enumerate(dist.get_process_group_ranks(group) if group is not None else range(world)):
                if (start := min(i * size, p.ds_numel)) < p.ds_numel:
                    out.setdefault(name, {})[r] = (start, min((i + 1) * size, p.ds_numel) - start)
    mine = {name: piece for name, p in params.items()
            if not hasattr(p, "ds_tensor") and (piece := _local_piece(p))[1] > 0}
    every: list[Any] = [None] * world
    dist.all_gather_object(every, mine)
    for r, pieces in enumerate(every):
        for name, piece in pieces.items():
            out.setdefault(name, {})[r] = tuple(piece)  # type: ignore[assignment]
    for name, p in params.items():
        numel = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        got = sorted(out.get(name, {}).values())
        if sum(n for _, n in got) != numel or any(a + n != b for (a, n), (b, _) in zip(got, got[1:])):
            raise RuntimeError(f"the ZeRO partitions of {name} do not cover its {numel} elements once: {got[:4]}")
    engine._kai_layout = owner, out
    return owner, out


def _assemble(p: torch.nn.Parameter, key: str | None, pieces: Mapping[int, tuple[int, int]], owner: int,
              rank: int) -> torch.Tensor | None:
    """The whole tensor on its owner (a CPU float32 copy; None elsewhere): the owner receives each
    other holder's piece, the holders send theirs to it, nobody else takes part."""
    import torch.distributed as dist

    shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
    if rank == owner:
        buf = torch.empty(math.prod(shape), dtype=torch.float32, device=_comm_device())
        waits = []
        for r, (start, numel) in sorted(pieces.items()):
            if r == rank:
                buf[start:start + numel].copy_(_piece_data(p, key, numel))
            else:
                waits.append(dist.irecv(buf[start:start + numel], src=r))
        for w in waits:
            w.wait()
        return buf.view(shape).to("cpu", copy=True)
    if rank in pieces:
        data = _piece_data(p, key, pieces[rank][1])
        dist.send(data.to(_comm_device(), torch.float32).contiguous(), dst=owner)
    return None


def _comm_device() -> torch.device:
    """Where pieces travel from: the rank's GPU under NCCL (also when ZeRO offloads them to the host), the CPU under gloo."""
    from kai_train.engine import backend

    return torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else torch.device("cpu")


def write_share(run_dir: Path, step: int, rank: int, world: int, weights: Mapping[str, torch.Tensor],
                moments: Mapping[str, torch.Tensor], opt_step: int | None) -> dict[str, Any]:
    """Write this rank's shard files atomically, hash them in the same pass, then the sidecar."""
    out: dict[str, Any] = {"rank": rank, "world": world, "files": {}, "leaves": {}, "optimizer_leaves": {},
                           "optimizer_step": opt_step}
    (run_dir / layout.checkpoint_dir(step)).mkdir(parents=True, exist_ok=True)
    for kind, tensors, key in (("model", weights, "leaves"), ("optimizer", moments, "optimizer_leaves")):
        if kind == "optimizer" and opt_step is None:
            continue
        name = layout.checkpoint_shard(step, kind, rank, world)
        save_weights(tensors, run_dir / name)
        failpoints.reached("shard-written")
        sha, leaves = hash_safetensors(run_dir / name)
        out["files"][name] = sha
        out[key].update(leaves)
    side = sidecar(run_dir, step, rank)
    side.parent.mkdir(parents=True, exist_ok=True)
    tmp = side.with_name(f".{side.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(out, sort_keys=True))
    os.replace(tmp, side)  # the sidecar appears whole or not at all
    return out


class ShareError(KaiError, RuntimeError):
    """A rank's share of a checkpoint was not written; the message names the rank and the problem."""


class ShareWriter:
    """A per-rank background thread that writes and hashes this rank's shares in step order, so the
    training loop only pays for assembling the tensors. A failure is raised by the next `check()`
    or by `close()` (which waits for every pending write), never swallowed."""

    def __init__(self, run_dir: Path, rank: int, world: int, background: bool = True) -> None:
        self.run_dir, self.rank, self.world, self.background = run_dir, rank, world, background
        self._jobs: queue.Queue[tuple[int, dict, dict, int | None] | None] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name=f"kai-share-writer-{rank}", daemon=True)
        if background:
            self._thread.start()

    def submit(self, step: int, weights: dict, moments: dict, opt_step: int | None) -> None:
        self.check()
        if not self.background:
            write_share(self.run_dir, step, self.rank, self.world, weights, moments, opt_step)
            return
        self._jobs.put((step, weights, moments, opt_step))

    def check(self) -> None:
        if self._error is not None:
            raise ShareError(f"rank {self.rank}: checkpoint shard not written: {type(self._error).__name__}: "
                             f"{self._error}")

    def close(self) -> None:
        if self.background and self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        self.check()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            step, weights, moments, opt_step = job
            try:
                if self._error is None:
                    write_share(self.run_dir, step, self.rank, self.world, weights, moments, opt_step)
            except BaseException as e:  # noqa: BLE001 - reaches the training loop through check()
                self._error = e
            finally:
                self._jobs.task_done()
        self._jobs.task_done()


class SignedTensors(Mapping[str, torch.Tensor]):
    """The tensors of a signed state split over shard files, read one tensor at a time (resume and
    replay never hold more than one tensor of it). A tensor in two files is refused."""

    def __init__(self, paths: list[Path]) -> None:
        from safetensors import safe_open

        self.where: dict[str, Path] = {}
        for path in paths:
            with safe_open(str(path), "pt") as f:
                for name in f.keys():
                    if name in self.where:
                        raise ValueError(f"{path}: tensor {name} is also in {self.where[name]}")
                    self.where[name] = path

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.where[name]), "pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)

    def values(self, name: str, shape: tuple[int, ...], start: int, stop: int) -> torch.Tensor:  # type: ignore[override]
        """kai_train.engine.Values: elements [start, stop) of a tensor, float32, flat."""
        t = self[name]
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{self.where[name]}: tensor {name} has shape {tuple(t.shape)}, the model {tuple(shape)}")
        return t.to(torch.float32).reshape(-1)[start:stop]


def restore(engine, weights: SignedTensors, moments: Mapping[str, torch.Tensor] | None, opt_step: int | None,
            step: int) -> None:
    """Put a signed state into a fresh engine: float32 master weights (and the module's copies), AdamW
    moments and step count, and the lr schedule advanced to `step`. What resume and replay both run;
    under ZeRO-3 each rank reads only the slices of its partitions."""
    from kai_train.engine import fill, load_full_optimizer_state

    from kai_train import expert_parallel

    if expert_parallel.of(engine.module) > 1:  # this rank holds some experts: compare every tensor's name
        from kai_train.engine import canonical_shapes

        params = set(canonical_shapes(engine.module.cfg))
    else:
        params = {n for n, _ in engine.module.named_parameters()}
    if params != set(weights):
        raise ValueError(f"signed weights name {len(weights)} tensors, the model has {len(params)}: "
                         f"{sorted(params ^ set(weights))[:3]}")
    fill(engine, weights.values)
    if moments is not None:
        load_full_optimizer_state(engine, moments, int(opt_step or 0))
    for _ in range(step):
        engine.lr_scheduler.step()
