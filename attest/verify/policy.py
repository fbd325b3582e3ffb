"""The evaluator's verification policy (`kai-attest verify --policy FILE`).

A policy says what the evaluator accepts, independently of anything the bundle claims: which
keys (or keyless identities, with the Sigstore trusted root they chain to) may sign, which hash
settings an OMS signature must use, which data licences and collection methods are allowed, which
checks must run, and size limits on what the verifier reads. The schema is documented in
docs/evaluators-guide.md; docs/policy.example.json is a complete example.

JSON is the format. A `.yaml`/`.yml` file is read too when PyYAML happens to be installed (it is
not a dependency of the evaluator's light install). Unknown keys are refused, so a typo in a
policy never silently weakens it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attest import inputs, jsonread
from attest.verify.checknames import CHECK_NAMES
from attest.errors import KaiError

MAX_POLICY_BYTES = 1 << 20
KEYID = re.compile(r"^(sha256:)?([0-9a-f]{64})$")

# Limits applied when the policy sets none. Bounds, not quotas: they stop a hostile bundle from
# making the verifier read (or an archive from writing) without end. The defaults are sized for an
# evaluator's laptop (a bundle of a model up to about 10B parameters with its optimizer state); a
# policy raises them for larger models (`limits` in docs/evaluators-guide.md).
DEFAULT_LIMITS = {
    "max_bundle_bytes": 64 << 30,  # everything under the bundle folder, and an archive once extracted
    "max_file_bytes": 64 << 30,  # one file
    "max_chain_bytes": 64 << 20,  # chain.jsonl (parsed, it takes up to about 30 times this in memory)
    "max_archive_members": 200_000,  # files in a bundle .tar / .tar.gz
    "max_genesis_params": 20_000_000_000,  # elements a genesis re-derivation may generate
    "max_replay_ranks": 64,  # processes one segment replay may start (the world size the segment recorded)
    # What one segment replay may cost, checked before any process starts (attest.verify.replay_cost).
    # Above a limit the segment is not replayed and the verdict is INCOMPLETE (raise the limit to replay it).
    "max_replay_micro_batches": 1 << 16,  # steps x grad_accum x ranks of one segment
    "max_replay_tokens": 1 << 28,  # steps x grad_accum x ranks x micro_batch x text_len of one segment
    "max_replay_memory_bytes": 32 << 30,  # estimated resident memory of one replay, all ranks together
    "replay_timeout_s": 3600,  # wall-clock limit of one replay process tree
}

# Checks whose "skipped" always fails the verdict: the ones that apply to every bundle kai-train
# writes. `replay` and `data-replay` are added whenever --replay / --replay-data ask for them (asking
# for a check and not getting it is a failure). timestamps, oms-signature (absent for keyless runs)
# ... are opt-in: a policy lists them in `required_checks` (added to these) to make a skip a failure.
DEFAULT_REQUIRED = ("statement-format", "signature", "chain-sequence", "chain-link", "statement-order",
                    "subject-digest", "weights-digest", "genesis", "trajectory", "release")

KNOWN_KEYS = {"policy_version", "keys", "sigstore_identities", "oms", "allowed_licenses",
              "allowed_collection_methods", "synthetic_requires_generator", "required_checks", "limits",
              "description", "tsa_roots", "tsa_intermediates", "sigstore_trusted_root", "replay"}
REPLAY_KEYS = {"segments", "max_drift"}
DEFAULT_REPLAY_SEGMENTS = 1  # segments drawn at random when neither --replay nor the policy says (the last is added)
OMS_KEYS = {"hash_type", "method", "allow_symlinks"}


class PolicyError(KaiError, ValueError):
    """The policy file is unreadable or invalid; the message names the file and the field (exit 2)."""


@dataclass
class SigstoreIdentity:
    identity: str  # the certificate's SAN (an e-mail, a workflow URI)
    issuer: str  # the OIDC issuer URL


@dataclass
class Policy:
    source: str = ""
    key_files: list[Path] = field(default_factory=list)  # PEM public keys
    keyids: list[str] = field(default_factory=list)  # hex sha256 of the DER public key
    sigstore_identities: list[SigstoreIdentity] = field(default_factory=list)
    # Keyless entries verify against this Sigstore trusted root (sigstore.models.TrustedRoot: Fulcio
    # CAs, Rekor and CT log keys), read from the trusted_root.json the policy names.
    sigstore_trusted_root: Any = None
    sigstore_trusted_root_path: Path | None = None
    oms: dict[str, Any] = field(default_factory=dict)  # pinned serialization settings
    allowed_licenses: list[str] | None = None  # SPDX ids; None = not judged
    allowed_collection_methods: list[str] | None = None
    synthetic_requires_generator: bool = False
    required_checks: list[str] | None = None  # added to DEFAULT_REQUIRED
    limits: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    # RFC 3161 TSAs the evaluator trusts for time (cryptography x509.Certificate): self-signed roots,
    # and intermediates that may sit between a root and a TSA certificate.
    tsa_roots: list[Any] = field(default_factory=list)
    tsa_intermediates: list[Any] = field(default_factory=list)
    # Replay: segments drawn at random by default (--replay overrides), and the drift budget tolerance
    # mode may accept (a fraction of a segment's own update; None: tolerance never passes).
    replay_segments: int = DEFAULT_REPLAY_SEGMENTS
    max_drift: float | None = None

    @property
    def pins_keys(self) -> bool:
        """The policy names who may sign: keys, or keyless identities (whose entries then need
        `sigstore_trusted_root`); the bundle's own key is not trusted then."""
        return bool(self.key_files or self.keyids or self.sigstore_identities)

    @property
    def pins_keyless(self) -> bool:
        return bool(self.sigstore_identities) and self.sigstore_trusted_root is not None

    @property
    def required(self) -> tuple[str, ...]:
        return DEFAULT_REQUIRED + tuple(c for c in self.required_checks or [] if c not in DEFAULT_REQUIRED)


def _str_list(raw: dict[str, Any], key: str, where: str) -> list[str] | None:
    v = raw.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise PolicyError(f"{where}: `{key}` must be a list of non-empty strings")
    return list(v)


def _tsa_certs(raw: dict[str, Any], key: str, where: str, base: Path | None) -> list[Any]:
    """The PEM certificates in the files `raw[key]` names (paths relative to `base`); a root must
    be self-signed. Raises PolicyError naming the policy, the field and the file."""
    from cryptography import x509

    certs = []
    for i, name in enumerate(_str_list(raw, key, where) or []):
        path = Path(name) if Path(name).is_absolute() or base is None else base / name
        try:
            found = x509.load_pem_x509_certificates(inputs.read_bytes(path, MAX_POLICY_BYTES, where=str(path)))
        except inputs.InputError as e:
            raise PolicyError(f"{where}: {key}[{i}] {e}") from None
        except ValueError:
            raise PolicyError(f"{where}: {key}[{i}] {path}: not a PEM X.509 certificate") from None
        for c in found:
            if key == "tsa_roots" and c.issuer != c.subject:
                raise PolicyError(f"{where}: {key}[{i}] {path}: {c.subject.rfc4514_string()} is not a self-signed "
                                  "root (list intermediates under tsa_intermediates)")
        certs += found
    return certs


def parse_policy(raw: Any, where: str = "policy", base: Path | None = None) -> Policy:
    """Validate a decoded policy document. Relative key paths are taken from `base`."""
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: a policy is a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        raise PolicyError(f"{where}: unknown field(s) {unknown} (known: {sorted(KNOWN_KEYS)})")
    if raw.get("policy_version", 1) != 1:
        raise PolicyError(f"{where}: policy_version {raw.get('policy_version')!r}; this verifier reads 1")
    p = Policy(source=where)
    for k in _str_list(raw, "keys", where) or []:
        m = KEYID.match(k.lower())
        if m:
            p.keyids.append(m.group(2))
        else:
            path = Path(k)
            path = path if path.is_absolute() or base is None else base / path
            try:
                inputs.check_path(path)
            except inputs.InputError as e:
                raise PolicyError(f"{where}: keys: {e}") from None
            p.key_files.append(path)
    idents = raw.get("sigstore_identities") or []
    if not isinstance(idents, list):
        raise PolicyError(f"{where}: `sigstore_identities` must be a list of {{identity, issuer}} objects")
    for i, ident in enumerate(idents):
        if not isinstance(ident, dict) or set(ident) != {"identity", "issuer"} or not all(
                isinstance(v, str) and v for v in ident.values()):
            raise PolicyError(f"{where}: sigstore_identities[{i}] must be {{identity, issuer}} (non-empty strings)")
        p.sigstore_identities.append(SigstoreIdentity(ident["identity"], ident["issuer"]))
    root = raw.get("sigstore_trusted_root")
    if root is not None:
        if not isinstance(root, str) or not root:
            raise PolicyError(f"{where}: `sigstore_trusted_root` must be the path of a Sigstore trusted_root.json")
        if not p.sigstore_identities:
            raise PolicyError(f"{where}: sigstore_trusted_root needs sigstore_identities (who may sign keyless)")
        from attest.keyless import load_trusted_root

        path = Path(root) if Path(root).is_absolute() or base is None else base / root
        try:
            p.sigstore_trusted_root = load_trusted_root(path, MAX_POLICY_BYTES)
        except ValueError as e:
            raise PolicyError(f"{where}: sigstore_trusted_root {path}: {e}") from None
        except ImportError:
            raise PolicyError(f"{where}: sigstore_trusted_root needs sigstore-python (pip install sigstore)") from None
        p.sigstore_trusted_root_path = path
    oms = raw.get("oms") or {}
    if not isinstance(oms, dict) or set(oms) - OMS_KEYS:
        raise PolicyError(f"{where}: `oms` pins only {sorted(OMS_KEYS)}")
    for k, v in oms.items():
        if not isinstance(v, bool if k == "allow_symlinks" else str):
            raise PolicyError(f"{where}: oms.{k} must be {'true or false' if k == 'allow_symlinks' else 'a string'}")
    if not isinstance(raw.get("description", ""), str):
        raise PolicyError(f"{where}: `description` must be a string")
    p.oms = dict(oms)
    p.allowed_licenses = _str_list(raw, "allowed_licenses", where)
    p.allowed_collection_methods = _str_list(raw, "allowed_collection_methods", where)
    srg = raw.get("synthetic_requires_generator", False)
    if not isinstance(srg, bool):
        raise PolicyError(f"{where}: synthetic_requires_generator must be true or false")
    p.synthetic_requires_generator = srg
    p.required_checks = _str_list(raw, "required_checks", where)
    unknown = [c for c in p.required_checks or [] if c not in CHECK_NAMES]
    if unknown:
        raise PolicyError(f"{where}: required_checks names {', '.join(map(repr, unknown[:5]))}, not a check of this "
                          f"verifier (known: {', '.join(CHECK_NAMES)})")
    p.tsa_roots = _tsa_certs(raw, "tsa_roots", where, base)
    p.tsa_intermediates = _tsa_certs(raw, "tsa_intermediates", where, base)
    replay = raw.get("replay") or {}
    if not isinstance(replay, dict) or set(replay) - REPLAY_KEYS:
        raise PolicyError(f"{where}: `replay` sets only {sorted(REPLAY_KEYS)}")
    if "segments" in replay:
        n = replay["segments"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise PolicyError(f"{where}: replay.segments must be a whole number ≥ 0")
        p.replay_segments = n
    if replay.get("max_drift") is not None:
        p.max_drift = parse_drift(replay["max_drift"], f"{where}: replay.max_drift")
    limits = raw.get("limits") or {}
    if not isinstance(limits, dict):
        raise PolicyError(f"{where}: `limits` must be an object")
    for k, v in limits.items():
        if k not in DEFAULT_LIMITS:
            raise PolicyError(f"{where}: unknown limit {k!r} (known: {sorted(DEFAULT_LIMITS)})")
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise PolicyError(f"{where}: limits.{k} must be a positive integer")
        p.limits[k] = v
    return p


def parse_drift(v: Any, where: str) -> float:
    """A drift budget: a number in (0, 1], the fraction of a segment's own update a claimed end state
    may differ from the evaluator's replays and still be accepted in tolerance mode."""
    if isinstance(v, str):
        try:
            v = float(v.rstrip("%")) / 100 if v.endswith("%") else float(v)
        except ValueError:
            raise PolicyError(f"{where}: {v!r} is not a number") from None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v <= 1:
        raise PolicyError(f"{where}: expected a fraction in (0, 1] of a segment's update (e.g. 1e-3), got {v!r}")
    return float(v)


def load_policy(path: str | Path) -> Policy:
    path = Path(path)
    try:
        text = inputs.read_text(path, MAX_POLICY_BYTES, where=str(path))
    except inputs.InputError as e:
        raise PolicyError(f"{e} (the policy)") from None
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise PolicyError(f"{path}: YAML policies need PyYAML (pip install pyyaml); or write it as JSON") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PolicyError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    else:
        try:  # the verifier's strict reader: no duplicate keys, bounded numbers and nesting
            raw = jsonread.loads(text, str(path), MAX_POLICY_BYTES, max_depth=16)
        except jsonread.JsonReadError as e:
            raise PolicyError(str(e)) from None
    try:
        return parse_policy(raw, str(path), path.parent)
    except (TypeError, AttributeError, ValueError) as e:  # a field of a type no check above expected
        if isinstance(e, PolicyError):
            raise
        raise PolicyError(f"{path}: a field has the wrong type ({type(e).__name__}: {e})") from None
