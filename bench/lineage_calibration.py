"""Calibration of `kai-attest lineage`: per-component false-positive rate on independent pairs and
power on dependent pairs built by output-preserving transforms.

    python bench/lineage_calibration.py [--models 25] [--bases 4] [--steps 40] [--draws 49] [--match-layers] [--smoke]

Independent pairs: a pool of `--models` tiny models (kai_train's `tiny` preset), each from its own
genesis seed and trained `--steps` AdamW steps in-process on CPU; half the pool trains on one shared
data stream, half each on its own, so pairs see the same and different data. Every pair of the pool
is tested (models x (models - 1) / 2 pairs; the pairs share models, so they are not independent of
each other, but each one is an independent pair under the null). Dependent pairs: for each of the
first `--bases` pool models, the model against

- `finetune`   itself trained `--steps` more steps on other data;
- `units`      MLP units permuted and rescaled, heads permuted, q/k rescaled, noise at 0.5 x std;
- `residual-perm`  every residual stream permuted with sign flips (speech without signs: a GELU
                   follows its convolutions), norm gains permuted;
- `residual-rot`   text and vision streams rotated (norm gains folded into the matrices that read
                   them), speech permuted;
- `composed`   `units` without noise, per-head V/O rotations and norm scaling in the encoders, then
               `residual-rot`, then noise at 0.1 x std.

Printed: per component, the independent tests, the dependent verdicts among them (FPR, with the
95 % upper bound 3/n when none), the smallest p; then per transform and component the power
(dependent verdicts / dependent pairs) and the largest p. alpha and the Bonferroni threshold are
the CLI's (alpha 1e-3 over the comparable components of one run).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from attest.lineage import ROTATION_FIT, lineage, stream_fits  # noqa: E402
from kai_train.init import build_genesis_model  # noqa: E402
from kai_train.model import ModelConfig, MultimodalLM  # noqa: E402
from kai_train.symmetry import (  # noqa: E402
    in_block_maps, orthogonal, residual_map, signed_permutation, unit_maps,
)

CFG = ModelConfig()
LR = 3e-3
SD = dict[str, torch.Tensor]


def batch(g: torch.Generator, B: int = 8, T: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Arithmetic token sequences (learnable), random images and audio."""
    start = torch.randint(0, CFG.vocab_size, (B, 1), generator=g)
    step = torch.randint(1, 7, (B, 1), generator=g)
    tokens = (start + step * torch.arange(T + 1)) % CFG.vocab_size
    images = torch.rand(B, CFG.image_channels, CFG.image_size, CFG.image_size, generator=g)
    return tokens, images, torch.randn(B, CFG.audio_samples, generator=g) * 0.1


def train(sd: SD, data_seed: int, steps: int) -> SD:
    model = MultimodalLM(CFG)
    model.load_state_dict(sd)
    g = torch.Generator().manual_seed(data_seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    for _ in range(steps):
        tokens, images, audio = batch(g)
        logits = model(tokens[:, :-1], images, audio)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def noise(sd: SD, rel: float, seed: int) -> SD:
    g = torch.Generator().manual_seed(seed)
    return {k: v + rel * v.std() * torch.randn(v.shape, generator=g) if v.ndim >= 2 else v for k, v in sd.items()}


def transformed(sd: SD, kind: str, seed: int, steps: int) -> SD:
    g = torch.Generator().manual_seed(seed)
    dims = {"text": CFG.dim, "vision": CFG.vision_dim, "speech": CFG.speech_dim}
    rot = {s: orthogonal(d, g) for s, d in dims.items() if s != "speech"}
    rot["speech"] = signed_permutation(dims["speech"], g, signs=False)
    if kind == "finetune":
        return train(sd, data_seed=10_000 + seed, steps=steps)
    if kind == "units":
        return noise(unit_maps(sd, seed, CFG), 0.5, seed)
    if kind == "residual-perm":
        return residual_map(sd, {s: signed_permutation(d, g, signs=s != "speech") for s, d in dims.items()}, fold=False, cfg=CFG)
    if kind == "residual-rot":
        return residual_map(sd, rot, fold=True, cfg=CFG)
    if kind == "composed":
        return noise(residual_map(in_block_maps(unit_maps(sd, seed, CFG), seed, CFG), rot, fold=True, cfg=CFG), 0.1, seed)
    raise ValueError(kind)


TRANSFORMS = ("finetune", "units", "residual-perm", "residual-rot", "composed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=25, help="independent pool (pairs: models x (models - 1) / 2)")
    ap.add_argument("--bases", type=int, default=4, help="pool models each transform is applied to")
    ap.add_argument("--steps", type=int, default=40, help="AdamW steps of every pool model")
    ap.add_argument("--draws", type=int, default=49, help="null draws per lineage run")
    ap.add_argument("--match-layers", action="store_true", help="blocks matched across depths (lineage --match-layers)")
    ap.add_argument("--smoke", action="store_true", help="3 models, 1 base, 10 steps, 19 draws")
    args = ap.parse_args()
    if args.smoke:
        args.models, args.bases, args.steps, args.draws = 3, 1, 10, 19
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="kai-bench-lineage-") as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, work: Path) -> None:
    t0 = time.time()
    pool: list[Path] = []
    states: list[SD] = []
    for k in range(args.models):
        genesis = {n: t.detach().clone() for n, t in build_genesis_model(CFG, 1000 + k)[0].state_dict().items()}
        # half the pool on one shared data stream, half each on its own
        sd = train(genesis, data_seed=7 if k % 2 == 0 else 100 + k, steps=args.steps)
        states.append(sd)
        pool.append(work / f"m{k}.safetensors")
        save_file(sd, str(pool[-1]))
    print(f"pool: {args.models} models trained {args.steps} steps in {time.time() - t0:.0f} s")

    t1 = time.time()
    fp: dict[str, list[float]] = defaultdict(list)  # component -> p of every independent test
    fp_dep: dict[str, int] = defaultdict(int)
    fits: dict[str, list[float]] = defaultdict(list)  # stream -> held-out anchor fit of every pair
    aligned: dict[str, int] = defaultdict(int)
    runs = 0
    for i in range(args.models):
        for j in range(i + 1, args.models):
            report = lineage(pool[i], [pool[j]], null_draws=args.draws, match_layers=args.match_layers)
            runs += 1
            for stream, (fit, _, used) in stream_fits(pool[i], pool[j]).items():
                fits[stream].append(fit)
                aligned[stream] += used
            for r in report.results:
                if r.p_value is not None:
                    fp[r.component].append(r.p_value)
                    fp_dep[r.component] += r.verdict == "dependent"
    print(f"independent: {runs} pairs in {time.time() - t1:.0f} s")
    print(f"{'component':<18} {'tests':>5} {'dependent':>9} {'FPR':>8} {'95% bound':>9} {'min p':>9}")
    total_tests = total_dep = 0
    for comp in sorted(fp):
        n, d = len(fp[comp]), fp_dep[comp]
        total_tests, total_dep = total_tests + n, total_dep + d
        bound = 3 / n if d == 0 else math.nan
        print(f"{comp:<18} {n:>5} {d:>9} {d / n:>8.4f} {bound:>9.4f} {min(fp[comp]):>9.1e}")
    print(f"{'all':<18} {total_tests:>5} {total_dep:>9} {total_dep / max(1, total_tests):>8.5f} "
          f"{3 / max(1, total_tests) if total_dep == 0 else math.nan:>9.5f}")

    for stream in sorted(fits):
        print(f"independent pairs, {stream} stream: held-out anchor fit max {max(fits[stream]):.3f} "
              f"median {sorted(fits[stream])[len(fits[stream]) // 2]:.3f}; aligned in {aligned[stream]} of "
              f"{len(fits[stream])} pairs (a rotation needs {ROTATION_FIT})")

    t2 = time.time()
    power: dict[tuple[str, str], list[tuple[bool, float]]] = defaultdict(list)
    dep_fits: dict[tuple[str, str], list[tuple[float, bool]]] = defaultdict(list)
    for b in range(min(args.bases, args.models)):
        for kind in TRANSFORMS:
            path = work / f"dep{b}-{kind}.safetensors"
            moved = transformed(states[b], kind, seed=b + 1, steps=args.steps)
            save_file({k: v.contiguous() for k, v in moved.items()}, str(path))
            for r in lineage(path, [pool[b]], null_draws=args.draws, match_layers=args.match_layers).results:
                if r.p_value is not None:
                    power[(kind, r.component)].append((r.verdict == "dependent", r.p_value))
            for stream, (fit, perm, _) in stream_fits(path, pool[b]).items():
                dep_fits[(kind, stream)].append((fit, perm))
    print(f"dependent: {min(args.bases, args.models)} bases x {len(TRANSFORMS)} transforms in {time.time() - t2:.0f} s")
    comps = sorted({c for _, c in power})
    print(f"{'power':<14} " + " ".join(f"{c.split('.', 1)[1][:9]:>9}" for c in comps))
    print(f"{'':<14} " + " ".join(f"{c.split('.', 1)[0][:9]:>9}" for c in comps))
    for kind in TRANSFORMS:
        cells = []
        for c in comps:
            hits = power.get((kind, c), [])
            cells.append(f"{sum(h for h, _ in hits) / len(hits):>9.2f}" if hits else f"{'-':>9}")
        print(f"{kind:<14} " + " ".join(cells))
    for kind in TRANSFORMS:
        print(f"{kind:<14} anchor fit (min over bases; P = a signed permutation): " + ", ".join(
            f"{st} {min(f for f, _ in v):.3f}{' P' if all(p for _, p in v) else ''}"
            for (k, st), v in sorted(dep_fits.items()) if k == kind))
    print(f"{'largest p':<14} " + " ".join(
        f"{max((p for k in TRANSFORMS for _, p in power.get((k, c), [])), default=math.nan):>9.0e}" for c in comps))


if __name__ == "__main__":
    main()
