"""Sigstore keyless signing (Fulcio certificate + Rekor entry) and the reachability probe it needs.

Keyless signing ties each chain entry to an OIDC identity (a CI workload, a service account)
instead of a long-lived key: Fulcio issues a 10-minute certificate for an ephemeral key and Rekor
logs the signature, which also gives each entry a trusted time. It needs both services (public,
or a private Sigstore given by `trust_config`) and an OIDC token, so it is for networked
clusters only. Air-gapped clusters use `backend: pem` or `backend: pkcs11`.

Before anything slow (TUF refresh, token exchange) the services are probed in parallel with a
short timeout; an unreachable service fails at once with one line saying what to use instead.

A keyless entry's signature is bound to a certificate, not to a keyid: the signer makes whole
Sigstore bundles (`sign_statement`) rather than bare signatures, and a verifier checks them
with sigstore-python against an identity policy. sigstore is imported lazily.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from attest.signing import SignerError

PUBLIC = {"Fulcio": "https://fulcio.sigstore.dev", "Rekor": "https://rekor.sigstore.dev",
          "TUF": "https://tuf-repo-cdn.sigstore.dev"}
STAGING = {"Fulcio": "https://fulcio.sigstage.dev", "Rekor": "https://rekor.sigstage.dev",
           "TUF": "https://tuf-repo-cdn.sigstage.dev"}
CERT_RENEW_S = 480.0  # a new Fulcio certificate after this many seconds (they are valid for 600)
AIR_GAPPED = "use backend=pem or backend=pkcs11 on air-gapped clusters"


def probe(url: str, timeout_s: float) -> str | None:
    """None when `url` answers at all (any HTTP status), else why not. Bounded by `timeout_s`,
    name resolution included (urllib's own timeout does not cover DNS)."""
    result: list[str | None] = []

    def attempt() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s).close()
            result.append(None)
        except urllib.error.HTTPError:
            result.append(None)  # the server answered
        except urllib.error.URLError as e:
            result.append(str(getattr(e.reason, "strerror", None) or e.reason))
        except OSError as e:
            result.append(e.strerror or type(e).__name__)
        except ValueError as e:
            result.append(f"bad URL ({e})")

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout_s)
    return result[0] if result else f"no answer within {timeout_s:g} s"


def unreachable(services: dict[str, str], timeout_s: float) -> dict[str, str]:
    """Probe every service at once; return {name: "url: reason"} for those that did not answer."""
    reasons: dict[str, str | None] = {}
    threads = [threading.Thread(target=lambda n=n, u=u: reasons.__setitem__(n, probe(u, timeout_s)), daemon=True)
               for n, u in services.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s + 0.5)
    return {n: f"{services[n]}: {reasons.get(n) or 'no answer'}" for n in services if reasons.get(n, "x") is not None}


def services_of(trust_config: str | None, staging: bool) -> dict[str, str]:
    """The Fulcio and Rekor URLs a keyless signature needs (from a ClientTrustConfig file when given)."""
    if not trust_config:
        return dict(STAGING if staging else PUBLIC)
    try:
        signing = json.loads(Path(trust_config).read_text())["signingConfig"]
        return {"Fulcio": signing["caUrls"][0]["url"], "Rekor": signing["rekorTlogUrls"][0]["url"]}
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise SignerError(f"sigstore: {trust_config}: not a Sigstore ClientTrustConfig ({type(e).__name__}: {e})") from None


class SigstoreSigner:
    """Keyless signer: each statement becomes a Sigstore bundle with a Fulcio certificate and a Rekor entry."""

    def __init__(self, *, staging: bool = False, trust_config: str | None = None,
                 identity_token: str | None = None, timeout_s: float = 3.0) -> None:
        down = unreachable(services_of(trust_config, staging), timeout_s)
        if down:
            raise SignerError(
                f"sigstore keyless signing needs network access to Fulcio and Rekor (unreachable: "
                f"{'; '.join(down.values())}): {AIR_GAPPED}")
        try:
            from sigstore.models import ClientTrustConfig
            from sigstore.sign import SigningContext
        except ImportError:
            raise SignerError("sigstore: sigstore-python is not installed (pip install sigstore)") from None
        try:
            if trust_config:
                trust = ClientTrustConfig.from_json(Path(trust_config).read_text())
            else:
                trust = ClientTrustConfig.staging() if staging else ClientTrustConfig.production()
            self._ctx = SigningContext.from_trust_config(trust)
        except Exception as e:  # sigstore raises many types here (TUF, network, parsing)
            raise SignerError(f"sigstore: cannot load the trust root ({type(e).__name__}: {e})") from None
        self._raw_token = identity_token
        self._signer: Any = None
        self._signer_since = 0.0
        self.identity = self._token().identity
        self.keyid = f"sigstore:{self.identity}"

    def _token(self) -> Any:
        from sigstore.oidc import IdentityError, IdentityToken, detect_credential

        raw = self._raw_token or os.environ.get("SIGSTORE_ID_TOKEN")
        try:
            raw = raw or detect_credential()
        except IdentityError as e:
            raise SignerError(f"sigstore: cannot get an ambient OIDC identity ({e})") from None
        if not raw:
            raise SignerError("sigstore: no OIDC identity token (set SIGSTORE_ID_TOKEN, pass attest.identity_token, "
                              "or run where ambient credentials exist, e.g. GitHub Actions with id-token: write)")
        try:
            return IdentityToken(raw)
        except Exception as e:
            raise SignerError(f"sigstore: the OIDC identity token is not usable ({type(e).__name__}: {e})") from None

    def sign_statement(self, statement_json: bytes) -> dict[str, Any]:
        """Sign the statement's exact bytes; returns the Sigstore bundle (v0.3) as a JSON object."""
        from sigstore.dsse import Statement
        from sigstore.oidc import ExpiredIdentity
        from sigstore.sign import Signer

        stmt = Statement(statement_json)
        # Fulcio certificates live 10 minutes: a signer (and its cached certificate) is renewed
        # before that, so an expired certificate is never used.
        if self._signer is not None and time.monotonic() - self._signer_since > CERT_RENEW_S:
            self._signer = None
        try:
            if self._signer is None:
                self._signer = Signer(self._token(), self._ctx, cache=True)
                self._signer_since = time.monotonic()
            return json.loads(self._signer.sign_dsse(stmt).to_json())
        except ExpiredIdentity:
            self._signer = None
            raise SignerError("sigstore: the OIDC identity token has expired; give a fresh one") from None
        except SignerError:
            raise
        except Exception as e:
            raise SignerError(f"sigstore: keyless signing failed ({type(e).__name__}: {e})") from None

    def sign(self, data: bytes) -> bytes:
        raise SignerError("sigstore: keyless signing makes whole bundles (sign_statement), not bare signatures")

    def public_pem(self) -> bytes:
        return b""  # no long-lived key: the identity is in each entry's certificate
