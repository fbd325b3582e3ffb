"""Lineage: a calibrated, per-component independence test of a candidate model against references.

Null hypothesis (Zhu et al. 2025, "Independence Tests for Language Models"): the candidate and the
reference were initialised independently. If one of them comes from an initialisation whose
distribution does not change when a residual stream's coordinates are permuted (kai-init v1 and v2 draw
i.i.d. per tensor; norm gains are all 1) and from training that is equivariant to that permutation
(AdamW, RMSNorm, attention and RoPE all are), then permuting the reference's residual stream gives
an exchangeable copy under the null. So, per component:

0. alignment: the candidate's residual streams are mapped into the reference's coordinates, one
   orthogonal map per stream fitted on the anchors (token embedding, LM head, patch and position
   embeddings, the speech front end): a signed permutation whenever the map is one, a rotation only
   when it carries held-out anchor rows onto the reference's (learnt token geometry alone does not);
   anchor rows are carried by the map fitted on the other half of them. Fixed before the null draws;
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
models). A dependent component that both models inherit from a public kai-init genesis (seed 1234,
or a seed a bundle records) is reported as `shared initialisation` instead. Reads safetensors with
numpy only; never imports torch. See docs/lineage.md.
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
from attest.lineage.names import AUTO, LAYOUTS, NOT_COMPARED, Axis, ModelMap, Slot, component_sort_key, map_names

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
# Public geneses a component may share without being derived from the other model: kai-init/v2 of
# these seeds (1234 was kai-train's default before seeds were drawn), and of every seed a bundle
# among the inputs records. GENESIS_MODULE makes them (torch-free; absent: none are checked).
PUBLIC_SEEDS = (1234,)
GENESIS_MODULE = "kai_train.initspec"
GENESIS_RECIPE = "kai-init/v2"
SHARED = "shared initialisation"
# Residual-stream alignment: a stream is aligned when each half of its anchor rows has at least
# this many rows per stream coordinate; a fitted map is read as a signed permutation when every
# coordinate's largest entry is at least SNAP in magnitude.
MIN_ANCHOR_RATIO = 1.0
SNAP = 0.5
MAX_ALIGN_DIM = 8192  # wider streams are not aligned: three SVDs of d x d bound the work
# A rotation (a map that is no signed permutation) is applied only when it carries the anchors'
# held-out rows onto the reference's with mean cosine at least this: two models trained on like data
# have anchors alike up to a rotation (at most 0.44 over 300 independent tiny pairs), and a rotation
# fitted on them would carry learnt structure, not copying, into the blocks. A copy trained on for
# 7.5x its base's steps still fits 0.79 (text).
ROTATION_FIT = 0.7
# Stacks of different depths are matched block to block when candidate x reference blocks is at most
# this many (each pair is one comparison per null draw; its matrices are held at once).
MAX_ACROSS = 4096

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
    recipe: dict[str, Any] | None = None  # a bundle's genesis recipe (name, seed, model)
    layout: str = AUTO  # how its names are read (attest.lineage.names.LAYOUTS; auto: detected)

    def map(self) -> ModelMap:
        return map_names(self.shapes(), self.layout)

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


class GenesisWeights(Weights):
    """The kai-init/v2 genesis of a public seed, made for the tensor names and shapes of one model
    (kai_train.initspec, torch-free); tensors it has no rule for are absent."""

    def __init__(self, label: str, seed: int, like: Weights) -> None:
        super().__init__(label, {})
        from importlib import import_module  # kai_train is optional for attest: imported only here

        self.initspec, self.seed = import_module(GENESIS_MODULE), seed
        given = dict(like.shapes())
        # rules from all the names at once: a residual output's std depends on its stack's depth
        self.rules: dict[str, str] = self.initspec.rules_from_names(given)
        self.known = {n: given[n] for n in self.rules}
        self.made: dict[str, np.ndarray] = {}

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        return sorted(self.known.items())

    def non_float(self) -> list[str]:
        return []

    def array(self, name: str) -> np.ndarray:  # made when first compared: only components that need it
        if name not in self.made:
            self.made[name] = self.initspec.genesis_array(self.seed, name, self.known[name], self.rules[name])
        return self.made[name]


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


def _bundle_statement(root: Path, kind: str) -> dict[str, Any]:
    try:
        entries, _ = read_chain(safe_file(root, CHAIN_NAME, MAX_CHAIN_BYTES), MAX_CHAIN_BYTES)
    except (FileNotFoundError, BundlePathError) as e:
        raise LineageInputError(f"{root}: {e}") from None
    found = [e for e in entries if e.kind == kind]
    if not found:
        raise LineageInputError(f"{root / CHAIN_NAME}: no {kind} statement")
    return found[-1].statement


def _bundle_recipe(root: Path) -> dict[str, Any] | None:
    """The genesis recipe a bundle records (its seed and model), or None."""
    try:
        rec = _bundle_statement(root, "genesis").get("predicate", {}).get("recipe")
    except (LineageInputError, ChainError, AttributeError):
        return None
    return rec if isinstance(rec, dict) else None


def _bundle_subject(root: Path, kind: str) -> list[Path]:
    subjects = _bundle_statement(root, kind).get("subject")
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
        return Weights(p.name, _index_files(str(p), release), genesis=g, recipe=_bundle_recipe(p))
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
    if slot.view is not None:
        x = x.reshape(slot.view)
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


# ---------------------------------------------------------------------------------------------
# residual-stream alignment


@dataclass
class _Align:
    """The map from the candidate's coordinates of one residual stream to the reference's, fitted on
    the anchor matrices (rows fixed by the outside world: tokens, pixels, positions, mel bins).
    `rot` (d x d, orthogonal) is applied to every stream axis of the candidate (x @ rot); an anchor
    row uses the map fitted on the other half of the anchor rows (`folds`), so no anchor row is
    compared through a map fitted on itself. `perm`: the map and both halves' maps are signed
    permutations (`rot` then holds one exactly): only then are anchors aligned, and norm gains
    follow it unsigned."""

    stream: str
    rot: np.ndarray
    folds: tuple[np.ndarray, np.ndarray]
    perm: bool
    rows: int
    fit: float  # held-out mean cosine of anchor rows after the map


def _is_anchor(slot: Slot) -> bool:
    """A tensor whose rows the outside world fixes, read or written along exactly one stream axis."""
    kinds = [a.kind for a in slot.axes]
    return not slot.is_norm and kinds.count("stream") == 1 and "unit" not in kinds and "fixed" in kinds


def _stream_rows(x: np.ndarray, axis: int) -> np.ndarray:
    """(rows, d): every vector along the stream axis of `x`."""
    return np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])


def _procrustes(xc: np.ndarray, xr: np.ndarray) -> tuple[np.ndarray, bool]:
    """The orthogonal map R minimising |xc R - xr|, snapped to a signed permutation when it is one."""
    u, _, vt = np.linalg.svd(xc.T @ xr)
    rot = u @ vt
    r, c = linear_sum_assignment(np.abs(rot), maximize=True)
    if np.abs(rot[r, c]).min() >= SNAP:
        snapped = np.zeros_like(rot)
        snapped[r, c] = np.sign(rot[r, c])
        return snapped, True
    return rot, False


def _fit_alignment(cw: Weights, cmap: ModelMap, rw: Weights, rmap: ModelMap,
                   rotation_fit: float = ROTATION_FIT) -> dict[str, _Align]:
    """One map per residual stream that both models anchor with enough rows."""
    halves: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for comp in sorted(set(cmap.components) & set(rmap.components)):
        for role, cs in sorted(cmap.components[comp].items()):
            rs = rmap.components[comp].get(role)
            if rs is None or not _is_anchor(cs) or not _is_anchor(rs):
                continue
            a, a_axes = _orient(_load(cw, cs), cs)
            b, b_axes = _orient(_load(rw, rs), rs)
            if a_axes != b_axes or a.shape != b.shape:
                continue
            k = next(j for j, ax in enumerate(a_axes) if ax.kind == "stream")
            xc, xr = _stream_rows(a, k), _stream_rows(b, k)
            if xc.shape[0] < 2:
                continue
            # centred per coordinate and scaled to unit norm per tensor: each anchor weighs alike
            with np.errstate(over="ignore", invalid="ignore"):  # float64: no overflow short of hostile input
                xc, xr = xc.astype(np.float64), xr.astype(np.float64)
                xc, xr = xc - xc.mean(axis=0), xr - xr.mean(axis=0)
                nc, nr = np.linalg.norm(xc), np.linalg.norm(xr)
            if not (CONSTANT_EPS < nc < math.inf and CONSTANT_EPS < nr < math.inf):
                continue
            halves.setdefault(a_axes[k].name, []).append((xc / nc, xr / nr))
    out: dict[str, _Align] = {}
    for stream, pairs in sorted(halves.items()):
        d = pairs[0][0].shape[1]
        if any(xc.shape[1] != d for xc, _ in pairs):
            continue
        rows = sum(xc.shape[0] for xc, _ in pairs)
        if rows // 2 < MIN_ANCHOR_RATIO * d or d > MAX_ALIGN_DIM:
            continue
        halves_c = [np.concatenate([x[f::2] for x, _ in pairs]) for f in (0, 1)]
        halves_r = [np.concatenate([y[f::2] for _, y in pairs]) for f in (0, 1)]
        try:
            rot, perm = _procrustes(np.concatenate([x for x, _ in pairs]), np.concatenate([y for _, y in pairs]))
            folds = [_procrustes(halves_c[f], halves_r[f]) for f in (0, 1)]
        except np.linalg.LinAlgError:  # no SVD: the stream stays index-aligned
            continue
        # held out: each half's rows through the other half's map, cosine with the reference's row
        cos = [_row_cosines(halves_c[f] @ folds[1 - f][0], halves_r[f]) for f in (0, 1)]
        fit = float(np.concatenate(cos).mean())
        perm = perm and folds[0][1] and folds[1][1]
        if perm or fit >= rotation_fit:
            out[stream] = _Align(stream, rot.astype(np.float32), (folds[0][0].astype(np.float32),
                                                              folds[1][0].astype(np.float32)), perm, rows, fit)
    return out


def stream_fits(candidate: str | Path, reference: str | Path) -> dict[str, tuple[float, bool, bool]]:
    """Per residual stream the two models anchor: (held-out fit, whether the map is a signed
    permutation, whether the stream is aligned), as `lineage` fits it (for calibration)."""
    cw, rw = open_weights(candidate), open_weights(reference)
    cmap, rmap = cw.map(), rw.map()
    fitted = _fit_alignment(cw, cmap, rw, rmap, rotation_fit=-math.inf)  # every fitted stream
    return {s: (m.fit, m.perm, m.perm or m.fit >= ROTATION_FIT) for s, m in fitted.items()}


def _row_cosines(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    return np.where(n > 0, (x * y).sum(axis=1) / np.where(n > 0, n, 1.0), 0.0)


def _aligned(x: np.ndarray, axes: tuple[Axis, ...], slot: Slot, align: dict[str, _Align]) -> np.ndarray:
    """The candidate's oriented tensor `x` in the reference's stream coordinates."""
    for k, ax in enumerate(axes):
        m = align.get(ax.name) if ax.kind == "stream" else None
        if m is None or x.shape[k] != m.rot.shape[0]:
            continue
        if slot.is_norm:  # a gain per coordinate: it follows a permutation (unsigned), nothing else
            if m.perm:
                x = np.moveaxis(np.moveaxis(x, k, -1) @ np.abs(m.rot), -1, k)
            continue
        y = np.moveaxis(x, k, -1)
        if _is_anchor(slot):  # each half of the rows through the map fitted on the other half
            flat = y.reshape(-1, y.shape[-1])
            out = np.empty_like(flat)
            out[0::2], out[1::2] = flat[0::2] @ m.folds[1], flat[1::2] @ m.folds[0]
            y = out.reshape(y.shape)
        else:
            y = y @ m.rot
        x = np.moveaxis(y, -1, k)
    return x


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

    alt: _Plan | None = None  # the same component without the tensors on a stream left unaligned

    def values(self, draws: list[dict[str, np.ndarray]]) -> np.ndarray:
        """Mean over terms of each term's statistic, per draw, in chunks of bounded memory; with an
        `alt`, the larger of the two statistics (every draw alike, so the null is that of the max)."""
        chunk = max(1, CHUNK_ELEMENTS // max(t.size() for t in self.terms))
        out = np.zeros(len(draws))
        for lo in range(0, len(draws), chunk):
            part = draws[lo:lo + chunk]
            out[lo:lo + chunk] = np.mean([t.values(part) for t in self.terms], axis=0)
        return out if self.alt is None else np.maximum(out, self.alt.values(draws))

    def streams(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.terms:
            for m in t.mats:
                for axis, s in m.col_streams:
                    out[s] = m.col_shape[axis]
                if m.row_stream:
                    out[m.row_stream] = m.a.shape[0]
        return out


@dataclass
class _Across:
    """A candidate block of a stack whose depth differs from the reference's (pruned or grown): its
    statistic is the largest over every reference block of that stack, in every draw alike (so the
    null is that of the maximum), and the block it was matched to is the one that gives it at draw 0."""

    component: str
    plans: list[tuple[str, _Plan]]  # (reference block, plan), each with terms
    best: int = 0

    def values(self, draws: list[dict[str, np.ndarray]]) -> np.ndarray:
        per = np.stack([p.values(draws) for _, p in self.plans])  # (reference blocks, draws)
        self.best = int(per[:, 0].argmax())  # draw 0 is the identity: the observed match
        return per.max(axis=0)

    def streams(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, p in self.plans:
            out.update(p.streams())
        return out

    @property
    def matched(self) -> str:
        return self.plans[self.best][0]

    # what the row reports is the matched plan's
    roles = property(lambda self: self.plans[self.best][1].roles)
    skipped = property(lambda self: self.plans[self.best][1].skipped)
    raw_cosine = property(lambda self: self.plans[self.best][1].raw_cosine)
    norm_only = property(lambda self: self.plans[self.best][1].norm_only)


def _blocks(m: ModelMap) -> dict[str, list[str]]:
    """family -> its block components, in layer order."""
    out: dict[str, list[str]] = {}
    for comp in sorted(m.components, key=component_sort_key):
        family, _, rest = comp.partition(".")
        if rest.startswith("block."):
            out.setdefault(family, []).append(comp)
    return out


def _load(w: Weights, slot: Slot) -> np.ndarray:
    """The slot's tensor, or its parts (a block's experts) joined along the unit axis."""
    if not slot.parts:
        return w.array(slot.tensor)
    axis = next(j for j, a in enumerate(slot.axes) if a.kind == "unit")
    return np.concatenate([w.array(n) for n in slot.parts], axis=axis)


def _plan_component(comp: str, cw: Weights, cs: dict[str, Slot], rw: Weights, rs: dict[str, Slot],
                    max_units: int, rng: np.random.Generator, align: dict[str, _Align],
                    roles: set[str] | None = None) -> _Plan:
    plan = _Plan(comp, norm_only=all(s.is_norm for s in (*cs.values(), *rs.values())))
    groups: dict[tuple[str, int, int], list[_Matrix]] = {}
    cosines = []
    if roles is None:
        # A component between two streams (a projector) of which one is aligned and one is not: the
        # unaligned side may be the candidate's own stream, moved; the statistic is then also taken
        # on the aligned side's tensors alone, and the larger of the two is used.
        streams = {ax.name for slot in cs.values() for ax in slot.axes if ax.kind == "stream"}
        if streams & set(align) and streams - set(align):
            keep = {r for r, slot in cs.items() if r in rs and not slot.is_norm
                    and all(ax.name in align for ax in slot.axes if ax.kind == "stream")}
            if keep:
                alt = _plan_component(comp, cw, cs, rw, rs, max_units, rng, align, keep)
                plan.alt = alt if alt.terms else None
    for role in sorted((set(cs) | set(rs)) if roles is None else roles):
        if role in cs and cs[role].anchor_only or role in rs and rs[role].anchor_only:
            plan.skipped.append(f"{role}: {NOT_COMPARED}")
            continue
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
        a = _aligned(a, a_axes, cs[role], align)
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
    shared_init: str = ""  # the public genesis both models descend from ("kai-init/v2 seed 1234")
    matched: str = ""  # the reference block it was matched to, when the two stacks' depths differ
    null_values: list[float] = field(default_factory=list)  # the statistic under each null draw

    def line(self) -> str:
        ref = f"{self.reference}{' [control]' if self.control else ''}"
        if self.verdict == "not comparable":
            return f"{self.verdict:<15} {self.component:<20} ref={ref}  ({self.reason})"
        cos = f"  raw-cos={self.raw_cosine:.3f} (not used)" if self.raw_cosine is not None else ""
        shared = f"  ({self.reason})" if self.shared_init else ""
        comp = f"{self.component}~{self.matched.partition('.')[2]}" if self.matched else self.component
        return (f"{self.verdict:<15} {comp:<20} ref={ref}  p={self.p_value:.2e} "
                f"(threshold {self.threshold:.1e}, p_perm={self.p_perm:.3f})  stat={self.statistic:.4f} "
                f"null={self.null_mean:.4f}±{self.null_sd:.4f} z={self.z:.1f}{cos}{shared}")


@dataclass
class LineageReport:
    candidate: str
    references: list[str]
    alpha: float
    null_draws: int
    seed: int
    results: list[ComponentResult]
    unmatched: dict[str, list[str]]  # model label -> tensors no layout rule matched
    method: str = ("anchor-aligned streams / match-|r| / residual-stream permutation null / Student-t tail / "
                   "Bonferroni / shared public genesis")

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
        shared = [r for r in self.results if r.verdict == SHARED]
        if shared:
            out.append(f"note            {len(shared)} component(s) inherited from a public genesis by both models "
                       f"({', '.join(sorted({r.shared_init for r in shared}))}): shared initialisation, not counted")
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
             null_draws: int, seed: int, max_units: int, only: set[str] | None = None,
             match_layers: bool = False) -> list[ComponentResult]:
    rng = np.random.default_rng(seed)
    results: list[ComponentResult] = []
    # The candidate is brought into the reference's residual-stream coordinates first (fitted on the
    # anchors); the null then permutes the reference's streams as before, the candidate fixed.
    align = _fit_alignment(cand, cmap, ref, rmap)
    # Stacks whose depths differ (a pruned or grown model), or every stack with `match_layers`: each
    # candidate block is matched to the reference block it is most like, under the null too
    # (`_Across`), not compared index to index.
    cb, rb = _blocks(cmap), _blocks(rmap)
    across = {f for f in set(cb) & set(rb) if (match_layers or len(cb[f]) != len(rb[f]))
              and len(cb[f]) * len(rb[f]) <= MAX_ACROSS}
    plans: list[_Plan | _Across] = []
    for f in sorted(across):
        for comp in cb[f]:
            if only is not None and comp not in only:
                continue
            pairs = [(r, _plan_component(comp, cand, cmap.components[comp], ref, rmap.components[r], max_units, rng,
                                         align)) for r in rb[f]]
            usable = [(r, p) for r, p in pairs if p.terms]
            if usable:
                plans.append(_Across(comp, usable))
            else:
                results.append(ComponentResult(comp, label, "not comparable", control, raw_cosine=pairs[0][1].raw_cosine,
                                               skipped=pairs[0][1].skipped, reason=pairs[0][1].reason))
    for comp in sorted(set(cmap.components) | set(rmap.components), key=component_sort_key):
        if only is not None and comp not in only or comp.partition(".")[0] in across and ".block." in comp:
            continue
        if comp not in rmap.components or comp not in cmap.components:
            side = "reference" if comp not in rmap.components else "candidate"
            results.append(ComponentResult(comp, label, "not comparable", control, reason=f"absent in the {side}"))
            continue
        plan = _plan_component(comp, cand, cmap.components[comp], ref, rmap.components[comp], max_units, rng, align)
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
            p_perm=pp, raw_cosine=p.raw_cosine, norm_only=p.norm_only, roles=p.roles, skipped=p.skipped,
            matched=p.matched if isinstance(p, _Across) else "", null_values=[float(v) for v in null[:, j]]))
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


def _genesis_seeds(cand: Weights, refs: list[Weights], public: Iterable[int]) -> list[int]:
    """Seeds of the public geneses a component may share: a bundle candidate's own recorded seed
    (it can have started from no other), else the public seeds and every seed a reference bundle records."""
    def v2_seed(w: Weights) -> int | None:
        rec = w.recipe or {}
        seed = rec.get("seed")
        ok = rec.get("name") == GENESIS_RECIPE and isinstance(seed, int) and not isinstance(seed, bool)
        return seed if ok else None

    if cand.recipe is not None:
        own = v2_seed(cand)
        return [own] if own is not None else []
    seeds = [*public, *(s for s in map(v2_seed, refs) if s is not None)]
    return sorted(set(seeds), key=seeds.index)


def _shared_init(rows: list[ComponentResult], cand: Weights, cmap: ModelMap, ref: Weights, rmap: ModelMap,
                 seeds: list[int], null_draws: int, seed: int, max_units: int) -> None:
    """Relabel a dependent row `shared initialisation` when both models descend from the same public
    kai-init genesis and the candidate's component is at least as close to that genesis as to the
    reference (a component copied from the reference's trained weights is closer to them)."""
    floor = 1 / (null_draws + 1)
    todo = {r.component: r for r in rows if r.verdict == "dependent" and not r.control}
    for s in seeds:
        if not todo:
            return
        label = f"{GENESIS_RECIPE} seed {s}"
        try:
            gc, gr = GenesisWeights(label, s, cand), GenesisWeights(label, s, ref)
        except ImportError:
            return  # kai_train is not installed: no genesis to compare with
        def descends(x: ComponentResult | None, row: ComponentResult) -> bool:
            return (x is not None and x.p_value is not None and x.p_perm is not None and row.threshold is not None
                    and x.p_value <= row.threshold and x.p_perm <= floor)

        try:
            c_rows = {r.component: r for r in _compare(cand, cmap, gc, map_names(gc.shapes()), label, False,
                                                       null_draws, seed, max_units, set(todo))}
            # the reference is compared only where the candidate is closer to the genesis than to it
            only = {comp for comp, row in todo.items() if descends(c_rows.get(comp), row)
                    and (c_rows[comp].statistic or 0.0) >= (row.statistic or 0.0)}
            # (a block matched across depths is the reference's matched block there)
            r_only = {todo[comp].matched or comp for comp in only}
            r_rows = {r.component: r for r in _compare(ref, rmap, gr, map_names(gr.shapes()), label, False,
                                                       null_draws, seed, max_units, r_only)} if only else {}
        except ValueError:  # shapes no kai-init genesis can have: nothing shared with it
            continue
        for comp, row in list(todo.items()):
            c, r = c_rows.get(comp), r_rows.get(row.matched or comp)
            if comp in only and c is not None and r is not None and descends(r, row):
                row.verdict, row.shared_init = SHARED, label
                row.reason = (f"{SHARED} ({label}): both descend from this public genesis, candidate p={c.p_value:.1e} "
                              f"stat {c.statistic:.3f} (vs the reference {row.statistic:.3f}), reference "
                              f"p={r.p_value:.1e}; not evidence of copying from the reference")
                del todo[comp]


def lineage(candidate: str | Path, references: Iterable[str | Path | Weights], alpha: float = DEFAULT_ALPHA,
            null_draws: int = DEFAULT_NULL_DRAWS, seed: int = DEFAULT_SEED,
            max_units: int = DEFAULT_MAX_UNITS, public_seeds: Iterable[int] = PUBLIC_SEEDS,
            layout: str = AUTO, reference_layout: str = AUTO, match_layers: bool = False) -> LineageReport:
    """Test every component of `candidate` against every reference (and against its own genesis
    when the candidate is a bundle). A reference is a path or already opened `Weights` (a registry
    entry); `layout` and `reference_layout` say how names are read (auto: detected per model);
    `match_layers` matches blocks across depths even where both stacks are equally deep."""
    if null_draws < 9 or not 0 < alpha < 1:
        raise LineageInputError(f"null draws must be at least 9 (got {null_draws}) and alpha in (0, 1) (got {alpha})")
    for name in (layout, reference_layout):
        if name != AUTO and name not in LAYOUTS:
            raise LineageInputError(f"unknown layout {name!r} (known: {AUTO}, {', '.join(LAYOUTS)})")
    cand = open_weights(candidate, with_genesis=True)
    cand.layout = layout
    refs = [r if isinstance(r, Weights) else open_weights(r) for r in references]
    for r in refs:
        if r.layout == AUTO:
            r.layout = reference_layout
    cmap = cand.map()
    unmatched = {cand.label: cand.non_float() + cmap.unmatched}
    results: list[ComponentResult] = []
    labels: list[str] = []
    pairs: list[tuple[Weights, ModelMap, list[ComponentResult]]] = []
    for ref in refs:
        rmap = ref.map()
        label = ref.label if ref.label not in labels and ref.label != cand.label else f"{ref.label}#{len(labels) + 1}"
        labels.append(label)
        unmatched[label] = ref.non_float() + rmap.unmatched
        rows = _compare(cand, cmap, ref, rmap, label, False, null_draws, seed, max_units, match_layers=match_layers)
        pairs.append((ref, rmap, rows))
        results += rows
    if cand.genesis is not None:
        gmap = map_names(cand.genesis.shapes())
        results += _compare(cand, cmap, cand.genesis, gmap, CONTROL, True, null_draws, seed, max_units)
    _decide(results, alpha, null_draws)
    seeds = _genesis_seeds(cand, refs, public_seeds)
    for ref, rmap, rows in pairs:
        _shared_init(rows, cand, cmap, ref, rmap, seeds, null_draws, seed, max_units)
    order = {label: k for k, label in enumerate([*labels, CONTROL])}
    results.sort(key=lambda r: (order[r.reference], component_sort_key(r.component)))
    return LineageReport(cand.label, labels, alpha, null_draws, seed, results,
                         {k: v for k, v in unmatched.items() if v})
