"""Is lineage's LM-head test calibrated for models trained on the very same batches?

    python bench/lineage_same_data.py [--extra 40] [--perms 20000] [--tail-perms 2000000] [--smoke]

The calibration bench (bench/lineage_calibration.py) found one dependent `text.lm_head` verdict among
its 300 independent pairs, for two models trained on one shared batch sequence. This script trains
the 13 shared-stream models of that pool again (genesis seeds 1000, 1002, ..., 1024, data seed 7, 40
AdamW steps) and `--extra` more from seeds 2000, 2001, ... on the same stream, and for every pair
computes the LM head's statistic as lineage does for an index-aligned matrix with no stream aligned
(rows centred and scaled to unit norm, mean over tokens of the row correlation: trace(Aᵀ B) / V) and
its exact permutation null (`--perms` random permutations of the reference's text stream). Printed:
the z-scores against N(0, 1) (Kolmogorov-Smirnov), the permutation p-values against uniform, the
counts of z above 2, 3 and 4 against what a normal null expects, and, for the pair with the largest
z, its exact permutation p-value from `--tail-perms` permutations next to the normal tail.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kstest, norm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from lineage_calibration import CFG, train  # noqa: E402

from kai_train.init import build_genesis_model  # noqa: E402


def rows(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=1, keepdims=True)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def null_sums(m: np.ndarray, perms: np.ndarray) -> np.ndarray:
    """The statistic under each permutation of the reference's stream: sum_c M[c, perm(c)]."""
    return m[np.arange(m.shape[0])[None, :], perms].sum(axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--extra", type=int, default=40, help="models beyond the calibration pool's 13")
    ap.add_argument("--perms", type=int, default=20000, help="permutations per pair")
    ap.add_argument("--tail-perms", type=int, default=2_000_000, help="permutations for the largest-z pair")
    ap.add_argument("--smoke", action="store_true", help="3 models of the pool, 500 and 5,000 permutations")
    args = ap.parse_args()
    pool = [1000 + k for k in range(0, 25, 2)]
    if args.smoke:
        pool, args.extra, args.perms, args.tail_perms = pool[:3], 0, 500, 5000
    torch.set_num_threads(1)
    t0 = time.time()
    seeds = pool + [2000 + k for k in range(args.extra)]
    heads = {}
    for s in seeds:
        genesis = {n: t.detach().clone() for n, t in build_genesis_model(CFG, s)[0].state_dict().items()}
        heads[s] = rows(train(genesis, data_seed=7, steps=40)["text.lm_head.weight"].numpy().astype(np.float64))
    print(f"{len(seeds)} models (genesis seeds {seeds[0]}..{seeds[-1]}, one batch sequence, 40 steps) "
          f"in {time.time() - t0:.0f} s")
    rng = np.random.default_rng(0)
    d = CFG.dim
    perms = np.argsort(rng.random((args.perms, d)), axis=1)
    zs, ps, pairs = [], [], []
    for i, a in enumerate(seeds):
        for b in seeds[i + 1:]:
            m = heads[a].T @ heads[b] / heads[a].shape[0]
            obs, null = float(np.trace(m)), null_sums(m, perms)
            zs.append((obs - null.mean()) / null.std())
            ps.append((1 + int((null >= obs).sum())) / (len(null) + 1))
            pairs.append((a, b, m, obs))
    z = np.array(zs)
    n = len(z)
    print(f"{n} pairs: z mean {z.mean():.3f} sd {z.std():.3f}; KS of z against N(0,1) p = {kstest(z, 'norm').pvalue:.3f}; "
          f"KS of the permutation p-values against uniform p = {kstest(ps, 'uniform').pvalue:.3f}")
    for t in (2, 3, 4):
        print(f"  z > {t}: {int((z > t).sum())} (a normal null expects {n * norm.sf(t):.2f})")
    order = np.argsort(z)[::-1]
    print("  largest z: " + ", ".join(f"{z[k]:.2f} ({pairs[k][0]}, {pairs[k][1]})" for k in order[:5]))
    a, b, m, obs = pairs[order[0]]
    hits = total = 0
    chunk = 50_000
    while total < args.tail_perms:
        null = null_sums(m, np.argsort(rng.random((min(chunk, args.tail_perms - total), d)), axis=1))
        hits, total = hits + int((null >= obs).sum()), total + len(null)
    print(f"pair ({a}, {b}): {total} permutations, {hits} at or above the observed statistic: exact p = "
          f"{(1 + hits) / (total + 1):.1e}; normal tail at z {z[order[0]]:.2f}: {norm.sf(z[order[0]]):.1e}")


if __name__ == "__main__":
    main()
