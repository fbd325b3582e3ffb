"""Lineage: a calibrated, per-component independence test of a candidate model against references.

Null hypothesis (Zhu et al. 2025, "Independence Tests for Language Models"): the candidate and the
reference were initialised independently. If one of them comes from an initialisation whose
distribution does not change when a residual stream's coordinates are permuted (kai-init v1 and v2 draw
i.i.d. per tensor; norm gains are all 1) and from training that is equivariant to that permutation
(AdamW, RMSNorm, attention and RoPE all are), then permuting the reference's residual stream gives
an exchangeable copy under the null. So, per component:

1. statistic: residual-stream coordinates are aligned by index; hidden units private to the
   component (MLP units, attention rows, projector units) are matched by a linear assignment that
   maximises |Pearson correlation| of their weight rows (centred over the anchored axis, so a
   constant offset such as a norm gain's 1 or a row rescaling carries no weight); the statistic is
   the mean matched |correlation| over the component's matrices. Tensors without a private unit
   axis (embeddings, norm gains, biases) use the mean signed correlation of index-aligned rows;
2. null: the same statistic after T random permutations of each residual stream of the reference
   (matching redone each time);
3. p-value: the observed statistic's z-score against the null draws, read off a Student t with
   T-1 degrees of freedom (the prediction-interval form, which pays for estimating the null's mean
   and spread from T draws); `p_perm` = (1 + #null >= observed) / (T + 1) is the exact Monte Carlo
   p-value, floored at 1/(T+1).

A component is `dependent` when p <= alpha / m (Bonferroni over the m comparable component-and-
reference tests of the run) and the observed statistic exceeds every null draw; `independent` means
no evidence of dependence was found, nothing more. A raw cosine is reported for contrast and never
used (the Solar/GLM trap: norm gains initialised at 1 have raw cosine near 1 between unrelated
models). Reads safetensors with numpy only; never imports torch. See docs/lineage.md.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.stats import t as student_t

from attest import inputs
from attest.bundle import BundlePathError, safe_file
from attest.chain import ChainError, read_chain
from attest.digest import DigestError, TensorEntry, read_safetensors_index
from attest.errors import KaiError
from attest.layout import CHAIN_NAME, EXPORT_DIR, EXPORT_LLAMA_DIR
from attest.lineage.names import Axis, ModelMap, Slot, component_sort_key, map_names

DEFAULT_ALPHA = 1e-3
DEFAULT_NULL_DRAWS = 99
DEFAULT_SEED = 0
# Units beyond this many (per matched group) are subsampled on the candidate side: the assignment
# costs O(n^3) per null draw. The statistic stays valid (the null is computed the same way).
DEFAULT_MAX_UNITS = 1024
# Draws evaluated at once are bounded so a term's per-draw arrays stay under this many floats.
CHUNK_ELEMENTS = 1 << 23
# Work budget, charged from the headers before any tensor is read: elements of one compared tensor
# (read whole, as float32), and units of a matched group on either side (the correlation matrix of a
# draw is min(units, max_units) x units).
MAX_TENSOR_ELEMENTS = 1 << 28
MAX_GROUP_UNITS = 1 << 16
MAX_CHAIN_BYTES = 64 << 20  # a bundle's chain.jsonl read for its release and genesis subjects
CONSTANT_EPS = 1e-12  # a row whose centred norm is below this carries no information
P_FLOOR = 1e-300
CONTROL = "genesis (positive control)"

_FLOAT_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16}


class LineageInputError(KaiError, ValueError):
    """An input cannot be read as weights; the message names the file and the problem."""


# ---------------------------------------------------------------------------------------------
# reading weights (numpy only)


@dataclass
class Weights:
    """One model's tensors: name -> (file, index entry); read lazily, one tensor at a time."""

    label: str
    tensors: dict[str, tuple[Path, TensorEntry]]
    genesis: Weights | None = None  # a bundle's initial weights (the positive control)

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(n, e.shape) for n, (_, e) in self.tensors.items() if e.dtype in (*_FLOAT_DTYPES, "BF16")]

    def non_float(self) -> list[str]:
        return [f"{n} {e.dtype}: not a floating-point tensor" for n, (_, e) in sorted(self.tensors.items())
                if e.dtype not in (*_FLOAT_DTYPES, "BF16")]

    def array(self, name: str) -> np.ndarray:
        """float32 copy of one tensor (BF16/F16 widened by hand; F64 rounded: statistics need no more)."""
        path, e = self.tensors[name]
        n = math.prod(e.shape)
        width = 2 if e.dtype in ("BF16", "F16") else np.dtype(_FLOAT_DTYPES[e.dtype]).itemsize
        if e.end - e.start != n * width:
            raise LineageInputError(f"{path}: tensor {name!r} holds {e.end - e.start} bytes, "
                                    f"expected {n * width} for {e.dtype} {list(e.shape)}")
        if n == 0:
            raise LineageInputError(f"{path}: tensor {name!r} is empty ({list(e.shape)}); nothing to compare")
        if n > MAX_TENSOR_ELEMENTS:
            raise LineageInputError(f"{path}: tensor {name!r} has {n} elements (the limit is {MAX_TENSOR_ELEMENTS})")
        try:
            raw = np.memmap(path, dtype=np.uint8, mode="r", offset=e.start, shape=(e.end - e.start,))
        except (OSError, ValueError) as ex:
            raise LineageInputError(f"{path}: cannot read tensor {name!r} ({ex})") from None
        if e.dtype == "BF16":
            # bf16 is the top half of a float32: widen the bits and reinterpret.
            x = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            x = raw.view(np.dtype(_FLOAT_DTYPES[e.dtype]).newbyteorder("<"))
        with np.errstate(over="ignore", invalid="ignore"):
            out = x.astype(np.float32).reshape(e.shape)
        if not np.isfinite(out).all():
            raise LineageInputError(f"{path}: tensor {name!r} holds NaN or infinite values (in float32)")
        return out


def _index_files(label: str, files: list[Path]) -> dict[str, tuple[Path, TensorEntry]]:
    tensors: dict[str, tuple[Path, TensorEntry]] = {}
    for f in files:
        try:
            entries = read_safetensors_index(f)
        except DigestError as e:
            raise LineageInputError(str(e)) from None
        except OSError as e:
            raise LineageInputError(f"{f}: cannot read ({e.strerror})") from None
        for t in entries:
            if t.name in tensors:
                raise LineageInputError(f"{f}: tensor {t.name!r} also appears in {tensors[t.name][0]}")
            tensors[t.name] = (f, t)
    if not tensors:
        raise LineageInputError(f"{label}: no tensors")
    return tensors


def _bundle_subject(root: Path, kind: str) -> list[Path]:
    try:
        entries, _ = read_chain(safe_file(root, CHAIN_NAME, MAX_CHAIN_BYTES), MAX_CHAIN_BYTES)
    except (FileNotFoundError, BundlePathError) as e:
        raise LineageInputError(f"{root}: {e}") from None
    found = [e for e in entries if e.kind == kind]
    if not found:
        raise LineageInputError(f"{root / CHAIN_NAME}: no {kind} statement")
    subjects = found[-1].statement.get("subject")
    names = [s.get("name", "") for s in (subjects if isinstance(subjects, list) else []) if isinstance(s, dict)]
    # the released weights as trained (export/llama/ holds the same decoder, computed from them)
    names = [n for n in names if isinstance(n, str) and n.endswith(".safetensors")
             and not n.startswith(f"{EXPORT_DIR}/{EXPORT_LLAMA_DIR}/")]
    if not names:
        raise LineageInputError(f"{root / CHAIN_NAME}: the {kind} statement names no .safetensors file")
    try:
        return [safe_file(root, n) for n in names]
    except (FileNotFoundError, BundlePathError) as e:
        raise LineageInputError(f"{root}: {e}") from None


def open_weights(path: str | Path, with_genesis: bool = False) -> Weights:
    """A safetensors file, a folder of them (a sharded checkpoint), or a bundle (chain.jsonl):
    the bundle's released weights, with its genesis weights attached (`with_genesis`) as the
    positive control."""
    try:
        inputs.check_path(path)
        p = Path(path)
        if not p.exists():
            raise LineageInputError(f"{p}: no such file or folder")
        if not p.is_dir():  # a file the evaluator names (a Hugging Face cache links them): its link is followed
            p = Path(os.path.realpath(p))
    except (inputs.InputError, OSError) as e:
        raise LineageInputError(f"{path}: {getattr(e, 'strerror', None) or e}") from None
    if p.is_dir() and (p / CHAIN_NAME).is_file():
        try:
            release = _bundle_subject(p, "release")
            genesis = _bundle_subject(p, "genesis") if with_genesis else None
        except ChainError as e:
            raise LineageInputError(str(e)) from None
        g = Weights(f"{p.name}:genesis", _index_files(str(p), genesis)) if genesis else None
        return Weights(p.name, _index_files(str(p), release), genesis=g)
    if p.is_dir():
        files = sorted(Path(os.path.realpath(f)) for f in p.glob("*.safetensors") if f.is_file())
        if not files:
            raise LineageInputError(f"{p}: folder holds no .safetensors file and no {CHAIN_NAME}")
        return Weights(p.name, _index_files(str(p), files))
    return Weights(Path(path).name, _index_files(str(path), [p]))


# ---------------------------------------------------------------------------------------------
# the statistic


@dataclass
class _Matrix:
    """One tensor pair oriented as rows x columns, rows centred and scaled to unit norm."""

    role: str
    a: np.ndarray  # (rows_a, cols)
    b: np.ndarray  # (rows_b, cols)
    col_shape: tuple[int, ...]
    col_streams: list[tuple[int, str]]  # (axis in col_shape, stream) permuted in the null
    row_stream: str | None  # rows are a residual stream (index-aligned, permuted in the null)

    def columns(self, perms: dict[str, np.ndarray]) -> np.ndarray | slice:
        if not self.col_streams:
            return slice(None)
        idx = np.arange(math.prod(self.col_shape)).reshape(self.col_shape)
        for axis, stream in self.col_streams:
            idx = np.take(idx, perms[stream], axis=axis)
        return idx.ravel()

    def gather_b(self, draws: list[dict[str, np.ndarray]]) -> np.ndarray:
        """The reference rows under each draw's stream permutations: (draws, rows_b, cols)."""
        out = np.empty((len(draws), *self.b.shape), dtype=self.b.dtype)
        for t, perms in enumerate(draws):
            b = self.b[:, self.columns(perms)]
            out[t] = b[perms[self.row_stream]] if self.row_stream else b
        return out


@dataclass
class _Term:
    """A matched unit group (several matrices sharing their rows) or one index-aligned matrix."""

    kind: str  # "match" | "aligned"
    mats: list[_Matrix]
    sub: np.ndarray | None = None  # candidate rows kept when a group has too many units

    def size(self) -> int:
        """Elements held per draw while evaluating (bounds the draws evaluated at once)."""
        m = self.mats[0]
        return m.b.size + (m.a.shape[0] * m.b.shape[0] if self.kind == "match" else 0)

    def values(self, draws: list[dict[str, np.ndarray]]) -> np.ndarray:
        """The term's statistic under each draw; one matrix product per matrix for all draws."""
        if self.kind == "aligned":
            m = self.mats[0]
            # Signed: the mean of many signed correlations is close to normal under the null, so
            # its tail is read right; |r| of a few short vectors is half-normal and skewed.
            return np.einsum("ij,tij->ti", m.a, m.gather_b(draws)).mean(axis=1)
        sim = None
        for m in self.mats:
            a = m.a if self.sub is None else m.a[self.sub]
            b = m.gather_b(draws)  # (T, units_b, cols)
            c = (a @ b.reshape(-1, b.shape[-1]).T).reshape(a.shape[0], len(draws), b.shape[1])
            sim = c if sim is None else sim + c  # correlations (units_a, T, units_b)
        assert sim is not None
        sim = np.abs(sim) / len(self.mats)
        out = np.empty(len(draws))
        for t in range(len(draws)):
            r, c = linear_sum_assignment(sim[:, t, :], maximize=True)
            out[t] = sim[r, t, c].mean()
        return out


def _normalise_rows(x: np.ndarray) -> tuple[np.ndarray, int]:
    """Centre each row, scale to unit norm; returns the rows and how many were constant."""
    x = x - x.mean(axis=1, keepdims=True)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    const = n <= CONSTANT_EPS * max(1.0, float(np.abs(x).max(initial=0.0)))
    return np.where(const, 0.0, x / np.where(const, 1.0, n)), int(const.sum())


def _orient(x: np.ndarray, slot: Slot) -> tuple[np.ndarray, tuple[Axis, ...]]:
    """Squeeze leading 1s, cut a fused row range, move the unit axis (else axis 0) first."""
    x = x.reshape(x.shape[x.ndim - len(slot.axes):]) if x.ndim > len(slot.axes) else x
    if slot.rows is not None:
        x = x[slot.rows[0]:slot.rows[1]]
    axes = slot.axes
    if len(axes) == 1:
        return x.reshape(1, -1), (Axis("fixed", "one"), *axes)
    k = next((j for j, a in enumerate(axes) if a.kind == "unit"), 0)
    order = [k] + [j for j in range(len(axes)) if j != k]
    x, axes = np.transpose(x, order), tuple(axes[j] for j in order)
    # Merge runs of fixed axes, so a (w, C*p*p) patch matrix compares with a (w, C, p, p) conv.
    shape: list[int] = [x.shape[0]]
    merged: list[Axis] = [axes[0]]
    for n, ax in zip(x.shape[1:], axes[1:]):
        if ax.kind == "fixed" and merged[-1].kind == "fixed" and len(merged) > 1:
            shape[-1] *= n
        else:
            shape.append(n)
            merged.append(Axis("fixed", "") if ax.kind == "fixed" else ax)
    return x.reshape(shape), tuple(merged)


@dataclass
class _Plan:
    """The terms of one component for one (candidate, reference) pair, and what was left out."""

    component: str
    terms: list[_Term] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    reason: str = ""
    norm_only: bool = False
    raw_cosine: float | None = None

    def values(self, draws: list[dict[str, np.ndarray]]) -> np.ndarray:
        """Mean over terms of each term's statistic, per draw, in chunks of bounded memory."""
        chunk = max(1, CHUNK_ELEMENTS // max(t.size() for t in self.terms))
        out = np.zeros(len(draws))
        for lo in range(0, len(draws), chunk):
            part = draws[lo:lo + chunk]
            out[lo:lo + chunk] = np.mean([t.values(part) for t in self.terms], axis=0)
        return out

    def streams(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.terms:
            for m in t.mats:
                for axis, s in m.col_streams:
                    out[s] = m.col_shape[axis]
                if m.row_stream:
                    out[m.row_stream] = m.a.shape[0]
        return out


def _load(w: Weights, slot: Slot) -> np.ndarray:
    """The slot's tensor, or its parts (a block's experts) joined along the unit axis."""
    if not slot.parts:
        return w.array(slot.tensor)
    axis = next(j for j, a in enumerate(slot.axes) if a.kind == "unit")
    return np.concatenate([w.array(n) for n in slot.parts], axis=axis)


def _plan_component(comp: str, cw: Weights, cs: dict[str, Slot], rw: Weights, rs: dict[str, Slot],
                    max_units: int, rng: np.random.Generator) -> _Plan:
    plan = _Plan(comp, norm_only=all(s.is_norm for s in (*cs.values(), *rs.values())))
    groups: dict[tuple[str, int, int], list[_Matrix]] = {}
    cosines = []
    for role in sorted(set(cs) | set(rs)):
        if role not in rs or role not in cs:
            plan.skipped.append(f"{role}: only in the {'candidate' if role in cs else 'reference'}")
            continue
        a, a_axes = _orient(_load(cw, cs[role]), cs[role])
        b, b_axes = _orient(_load(rw, rs[role]), rs[role])
        if a_axes != b_axes or a.shape[1:] != b.shape[1:] or (a_axes[0].kind != "unit" and a.shape[0] != b.shape[0]):
            plan.skipped.append(f"{role}: shapes differ ({list(a.shape)} vs {list(b.shape)} after orienting)")
            continue
        col_streams = [(j - 1, ax.name) for j, ax in enumerate(a_axes) if j > 0 and ax.kind == "stream"]
        row_stream = a_axes[0].name if a_axes[0].kind == "stream" else None
        if not col_streams and row_stream is None:
            # e.g. a bias over hidden units: nothing aligns it, and matching it alone means nothing
            plan.skipped.append(f"{role}: no residual-stream axis to anchor it")
            continue
        if a.shape == b.shape:
            na, nb = np.linalg.norm(a), np.linalg.norm(b)
            if na > 0 and nb > 0:
                cosines.append(float((a * b).sum() / (na * nb)))
        col_shape = a.shape[1:]
        an, a_const = _normalise_rows(a.reshape(a.shape[0], -1))
        bn, b_const = _normalise_rows(b.reshape(b.shape[0], -1))
        if a_const == an.shape[0] or b_const == bn.shape[0]:
            who = "candidate" if a_const == an.shape[0] else "reference"
            plan.skipped.append(f"{role}: constant in the {who} (e.g. a norm gain still at its initial value)")
            continue
        if a_axes[0].kind == "unit" and max(an.shape[0], bn.shape[0]) > MAX_GROUP_UNITS:
            raise LineageInputError(f"{comp}.{role}: {max(an.shape[0], bn.shape[0])} units (the limit is "
                                    f"{MAX_GROUP_UNITS})")
        mat = _Matrix(role, an, bn, col_shape, col_streams, row_stream)
        plan.roles.append(role)
        if a_axes[0].kind == "unit":
            groups.setdefault((a_axes[0].name, an.shape[0], bn.shape[0]), []).append(mat)
        else:
            plan.terms.append(_Term("aligned", [mat]))
    for (_, units, _), mats in sorted(groups.items()):
        sub = np.sort(rng.choice(units, max_units, replace=False)) if units > max_units else None
        plan.terms.append(_Term("match", mats, sub))
    plan.raw_cosine = float(np.mean(cosines)) if cosines else None
    if not plan.terms:
        plan.reason = "; ".join(plan.skipped) or "no tensors to compare"
    return plan


# ---------------------------------------------------------------------------------------------
# results


@dataclass
class ComponentResult:
    component: str
    reference: str
    verdict: str  # "dependent" | "independent" | "not comparable"
    control: bool = False  # a positive-control row (candidate vs its own genesis)
    statistic: float | None = None
    null_mean: float | None = None
    null_sd: float | None = None
    z: float | None = None
    p_value: float | None = None
    p_perm: float | None = None
    threshold: float | None = None
    raw_cosine: float | None = None  # for contrast only: never used for a verdict
    norm_only: bool = False
    roles: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    reason: str = ""

    def line(self) -> str:
        ref = f"{self.reference}{' [control]' if self.control else ''}"
        if self.verdict == "not comparable":
            return f"{self.verdict:<15} {self.component:<20} ref={ref}  ({self.reason})"
        cos = f"  raw-cos={self.raw_cosine:.3f} (not used)" if self.raw_cosine is not None else ""
        return (f"{self.verdict:<15} {self.component:<20} ref={ref}  p={self.p_value:.2e} "
                f"(threshold {self.threshold:.1e}, p_perm={self.p_perm:.3f})  stat={self.statistic:.4f} "
                f"null={self.null_mean:.4f}±{self.null_sd:.4f} z={self.z:.1f}{cos}")


@dataclass
class LineageReport:
    candidate: str
    references: list[str]
    alpha: float
    null_draws: int
    seed: int
    results: list[ComponentResult]
    unmatched: dict[str, list[str]]  # model label -> tensors no layout rule matched
    method: str = "match-|r| / residual-stream permutation null / Student-t tail / Bonferroni"

    @property
    def dependent(self) -> list[ComponentResult]:
        return [r for r in self.results if r.verdict == "dependent" and not r.control]

    @property
    def control_failed(self) -> list[ComponentResult]:
        """Comparable control rows that did not come out dependent: there the test lacked power."""
        return [r for r in self.results if r.control and r.verdict == "independent"]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dependent_components"] = sorted({f"{r.component} <- {r.reference}" for r in self.dependent})
        d["control_not_dependent"] = [r.component for r in self.control_failed]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def lines(self) -> list[str]:
        out = [f"candidate: {self.candidate}   references: {', '.join(self.references)}",
               f"method: {self.method}; alpha {self.alpha:g}, {self.null_draws} null draws, seed {self.seed}"]
        out += [r.line() for r in self.results]
        for label, names in self.unmatched.items():
            for n in names:
                out.append(f"unmatched       {label}: {n}")
        for r in self.control_failed:
            out.append(f"warning         positive control not dependent for {r.component}: "
                       "an 'independent' verdict there carries no evidence")
        dep = self.dependent
        out.append(f"verdict: {len(dep)} component(s) dependent on a reference" if dep
                   else "verdict: no component dependent on any reference (absence of evidence, not proof)")
        return out


def _p_values(obs: float, null: np.ndarray) -> tuple[float, float, float, float, float]:
    """(null mean, null sd, z, parametric p, Monte Carlo p); the null's sd must be positive."""
    mean, sd = float(null.mean()), float(null.std(ddof=1))
    T = len(null)
    p_perm = (1 + int((null >= obs).sum())) / (T + 1)
    z = (obs - mean) / sd
    p = float(student_t.sf(z / math.sqrt(1 + 1 / T), df=T - 1))
    return mean, sd, z, max(p, P_FLOOR), p_perm


def _compare(cand: Weights, cmap: ModelMap, ref: Weights, rmap: ModelMap, label: str, control: bool,
             null_draws: int, seed: int, max_units: int) -> list[ComponentResult]:
    rng = np.random.default_rng(seed)
    results: list[ComponentResult] = []
    plans: list[_Plan] = []
    for comp in sorted(set(cmap.components) | set(rmap.components), key=component_sort_key):
        if comp not in rmap.components or comp not in cmap.components:
            side = "reference" if comp not in rmap.components else "candidate"
            results.append(ComponentResult(comp, label, "not comparable", control, reason=f"absent in the {side}"))
            continue
        plan = _plan_component(comp, cand, cmap.components[comp], ref, rmap.components[comp], max_units, rng)
        if plan.terms:
            plans.append(plan)
        else:
            results.append(ComponentResult(comp, label, "not comparable", control, raw_cosine=plan.raw_cosine,
                                           norm_only=plan.norm_only, skipped=plan.skipped, reason=plan.reason))
    sizes: dict[str, int] = {}
    for p in plans:
        sizes.update(p.streams())
    # Draw 0 is the identity (the observed statistic); the others permute every residual stream.
    draws = [{s: np.arange(n) for s, n in sizes.items()}]
    draws += [{s: rng.permutation(n) for s, n in sorted(sizes.items())} for _ in range(null_draws)]
    values = np.stack([p.values(draws) for p in plans], axis=1) if plans else np.zeros((len(draws), 0))
    obs, null = values[0], values[1:]
    for j, p in enumerate(plans):
        if not null[:, j].std() > 0:
            results.append(ComponentResult(p.component, label, "not comparable", control, raw_cosine=p.raw_cosine,
                                           norm_only=p.norm_only, roles=p.roles, skipped=p.skipped,
                                           reason="the null distribution is degenerate (a stream of length 1?)"))
            continue
        mean, sd, z, pv, pp = _p_values(obs[j], null[:, j])
        results.append(ComponentResult(
            p.component, label, "", control, statistic=float(obs[j]), null_mean=mean, null_sd=sd, z=z, p_value=pv,
            p_perm=pp, raw_cosine=p.raw_cosine, norm_only=p.norm_only, roles=p.roles, skipped=p.skipped))
    return results


def _decide(results: list[ComponentResult], alpha: float, null_draws: int) -> None:
    """Bonferroni over the comparable tests, separately for foreign references and the control.

    Dependent needs both the parametric p under the threshold and the observed statistic above
    every null draw (p_perm at its floor), so a heavy null tail cannot produce a verdict alone."""
    floor = 1 / (null_draws + 1)
    for control in (False, True):
        rows = [r for r in results if r.control == control and r.verdict != "not comparable"]
        for r in rows:
            assert r.p_value is not None and r.p_perm is not None
            r.threshold = alpha / len(rows)
            dependent = r.p_value <= r.threshold and r.p_perm <= floor
            r.verdict = "dependent" if dependent else "independent"


def lineage(candidate: str | Path, references: Iterable[str | Path], alpha: float = DEFAULT_ALPHA,
            null_draws: int = DEFAULT_NULL_DRAWS, seed: int = DEFAULT_SEED,
            max_units: int = DEFAULT_MAX_UNITS) -> LineageReport:
    """Test every component of `candidate` against every reference (and against its own genesis
    when the candidate is a bundle)."""
    if null_draws < 9 or not 0 < alpha < 1:
        raise LineageInputError(f"null draws must be at least 9 (got {null_draws}) and alpha in (0, 1) (got {alpha})")
    cand = open_weights(candidate, with_genesis=True)
    refs = [open_weights(r) for r in references]
    cmap = map_names(cand.shapes())
    unmatched = {cand.label: cand.non_float() + cmap.unmatched}
    results: list[ComponentResult] = []
    labels: list[str] = []
    for ref in refs:
        rmap = map_names(ref.shapes())
        label = ref.label if ref.label not in labels and ref.label != cand.label else f"{ref.label}#{len(labels) + 1}"
        labels.append(label)
        unmatched[label] = ref.non_float() + rmap.unmatched
        results += _compare(cand, cmap, ref, rmap, label, False, null_draws, seed, max_units)
    if cand.genesis is not None:
        gmap = map_names(cand.genesis.shapes())
        results += _compare(cand, cmap, cand.genesis, gmap, CONTROL, True, null_draws, seed, max_units)
    _decide(results, alpha, null_draws)
    order = {label: k for k, label in enumerate([*labels, CONTROL])}
    results.sort(key=lambda r: (order[r.reference], component_sort_key(r.component)))
    return LineageReport(cand.label, labels, alpha, null_draws, seed, results,
                         {k: v for k, v in unmatched.items() if v})
