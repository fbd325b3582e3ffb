"""What every verifier check works with: the `Context` (the bundle, its chain, the trusted keys,
the policy, cached file digests) and the `Finding` each check returns, plus small helpers that read
hostile JSON defensively (a check never raises on bad content: it reports it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attest.bundle import BundlePathError
from attest.chain import Entry
from attest.verify.checknames import CHECK_NAMES
from attest.digest import DigestError
from attest.errors import KaiError
from attest.layout import CHAIN_NAME, EXPORT_DIR, EXPORT_LLAMA_DIR
from attest.verify.policy import Policy
from attest.signing import PublicKeyVerifier
from attest.verify.cache import FileDigests

# What reading a hostile file may raise; a check turns these into findings. RecursionError: JSON
# nested deeper than the parser's stack (a header or manifest of "[[[[…").
UNREADABLE = (FileNotFoundError, BundlePathError, DigestError, OSError, ValueError, RecursionError)


class BundleUnreadable(KaiError):
    """The bundle cannot be read at all (exit 2)."""


@dataclass
class Finding:
    check: str
    ok: bool
    file: str = ""
    expected: str = ""
    found: str = ""
    detail: str = ""
    skipped: bool = False

    def __post_init__(self) -> None:
        if self.check not in CHECK_NAMES:  # a check's name is code, never bundle data: a typo is a bug
            raise ValueError(f"finding for an undeclared check {self.check!r} (attest.verify.checknames)")

    def line(self) -> str:
        """One terminal line; every field is passed through `term_safe` (bundle strings are hostile)."""
        check, file, expected, found, detail = (term_safe(x) for x in (self.check, self.file, self.expected,
                                                                       self.found, self.detail))
        if self.ok:
            return f"ok    {check:<17} {file} {detail}".rstrip()
        if self.skipped:
            return f"SKIP  {check:<17} {file}: {detail}"
        return f"FAIL  {check:<17} {file}: expected {expected}, found {found}" + (f" ({detail})" if detail else "")


def term_safe(x: Any) -> str:
    """`x` as text that cannot act on a terminal: every character that is not printable (C0 and C1
    controls such as ESC, CR, backspace; bidi overrides and other invisible format characters; line
    separators; lone surrogates) is written as a `\\xNN` / `\\uNNNN` escape. Plain text, spaces
    and printable non-ASCII pass unchanged."""
    s = x if isinstance(x, str) else str(x)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"
                   if ord(c) < 0x10000 else f"\\U{ord(c):08x}" for c in s)


def skipped(check: str, file: str, why: str) -> Finding:
    return Finding(check, False, file, detail=why, skipped=True)


HELD = "held by the team"  # how a skip for heavy state a light bundle leaves out begins (attest.challenge)


UNDECIDED = "not decided"  # how a part begins that neither passes nor fails: the verdict is INCOMPLETE


def undecided(check: str, file: str, why: str) -> Finding:
    """A part of a check that ran as far as it could here and neither holds nor fails (a replay beyond
    the policy's cost limits, a tolerance replay without an evaluator's drift budget): INCOMPLETE."""
    return skipped(check, file, f"{UNDECIDED}: {why}")


def held_skip(ctx: Context, check: str, file: str, what: str) -> Finding:
    """A part of a check not run on a light bundle because the state it reads is held by the team."""
    ctx.facts.setdefault("held_parts", 0)
    ctx.facts["held_parts"] += 1
    return skipped(check, file, f"{HELD}: {what} (light bundle; produced on challenge: kai-attest challenge)")


@dataclass
class Context:
    root: Path
    entries: list[Entry]
    trusted: list[PublicKeyVerifier]
    trusted_from_bundle: bool
    torn_tail: bool
    notes: list[str] = field(default_factory=list)
    policy: Policy = field(default_factory=Policy)
    replay: int | str | list[int] | None = None  # --replay: None, a count N, "all"; or a challenge's segments
    replay_seed: int | None = None  # --replay-seed: which segments; None = fresh randomness
    replay_data: bool = False  # --replay-data: recompute dedup and pack shards
    replay_mode: str = "auto"  # --replay-mode: auto | exact | tolerance (attest.verify.replay)
    replay_worlds: tuple[int, ...] | None = None  # --replay-worlds: tolerance mode's two world sizes
    light: bool = False  # --light / --packs: heavy state absent from the bundle is held by the team, not missing
    max_drift: float | None = None  # --max-drift / policy replay.max_drift: tolerance mode's budget (None: never passes)
    replay_default: bool = False  # the replay count is the default (not asked): not run on a bundle already failing
    facts: dict[str, Any] = field(default_factory=dict)  # what checks measured: --json, --report
    files: FileDigests = field(init=False)
    failed: set[str] = field(default_factory=set)  # checks that failed so far (for dependent checks)
    computed: dict[str, Any] = field(default_factory=dict)  # bulk results measured ahead (verifier's pool)

    def __post_init__(self) -> None:
        self.files = FileDigests(self.root, self.policy.limits["max_file_bytes"])
        self._by_kind: dict[str, list[Entry]] | None = None
        self._shards: dict[str, tuple[int, str | None]] | None = None

    def where(self, e: Entry) -> str:
        return f"{CHAIN_NAME}:{e.lineno}"

    @property
    def kinds(self) -> list[str]:
        return [e.kind for e in self.entries]

    def of_kind(self, kind: str) -> list[Entry]:
        if self._by_kind is None:  # the chain does not change while it is verified
            self._by_kind = {}
            for e in self.entries:
                self._by_kind.setdefault(e.kind, []).append(e)
        return list(self._by_kind.get(kind, ()))

    @property
    def run_config(self) -> dict[str, Any]:
        runs = self.of_kind("run")
        cfg = runs[0].predicate.get("config") if runs else None
        return cfg if isinstance(cfg, dict) else {}


def short(d: Any) -> str:
    d = "null" if d is None else str(d)
    return d[:16] + "…" if len(d) > 16 else d


def as_dict(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


def as_list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else []


def weights_files(e: Entry) -> list[str]:
    """The model weights a statement names: its .safetensors subjects, less optimizer state
    (`optimizer*.safetensors`, the AdamW moments a replay starts from) and the Llama folder's
    weights (export/llama/, computed from the released ones, which the release check renders)."""
    return [s["name"] for s in subjects_of(e)
            if s["name"].endswith(".safetensors") and not s["name"].rsplit("/", 1)[-1].startswith("optimizer")
            and not s["name"].startswith(f"{EXPORT_DIR}/{EXPORT_LLAMA_DIR}/")]


def subjects_of(e: Entry) -> list[dict[str, Any]]:
    """Subjects shaped {name: str, sha256: str|None}; statement-format reports malformed ones."""
    out = []
    for s in as_list(e.statement.get("subject")):
        if isinstance(s, dict) and isinstance(s.get("name"), str):
            sha = as_dict(s.get("digest")).get("sha256")  # anything but a string (a list, say) reads as none
            out.append({"name": s["name"], "sha256": sha if isinstance(sha, str) else None})
    return out


def shard_subjects(ctx: Context) -> dict[str, tuple[int, str | None]]:
    """Every subject name of every data-shard statement -> (chain index, sha256), first declaration."""
    if ctx._shards is None:
        ctx._shards = {}
        for i, e in enumerate(ctx.entries):
            if e.kind == "data-shard":
                for s in subjects_of(e):
                    ctx._shards.setdefault(s["name"], (i, s["sha256"]))
    return ctx._shards
