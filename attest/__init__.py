"""kai-train's provenance layer: digests, signed statements, the hash-linked chain, bundles and
the offline verifier behind `kai-attest`.

Imports only the standard library, `cryptography` and (lazily) `pyarrow`: an evaluator installs
this without torch. Checks that need torch (genesis re-derivation) load it on demand.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
