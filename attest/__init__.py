"""kai-train's provenance layer: digests, signed statements, the hash-linked chain, bundles and
the offline verifier behind `kai-attest`.

Imports only the standard library, `cryptography` and (lazily) `pyarrow`: an evaluator installs
this without torch. Checks that need torch (replay, and re-deriving an earlier kai-init/v1 genesis) load it on
demand; a kai-init/v2 genesis is re-derived without it.
"""

__all__ = ["__version__", "tool_version"]
__version__ = "0.1.0"


def tool_version() -> str:
    """The installed kai-train distribution's version (what statements, reports and --json name)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kai-train")
    except PackageNotFoundError:
        return "unknown (not installed)"
