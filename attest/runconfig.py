"""The run config as a person reads it: `config/run.yaml`, a canonical YAML rendering of the config
the run statement signs.

The trainer writes `render_yaml(config)`; the verifier (`run-config`) renders the signed config the
same way and requires the bytes of the bundle's file to be equal. No YAML parser is involved on
either side, so the check is the same in the evaluator's light install (no PyYAML) and cannot be
fooled by parser differences (tags, anchors, merge keys, duplicate keys, YAML 1.1 vs 1.2 scalars).

Keys are sorted (the signed statement's JSON does not keep the order the config was written in).
The rendering is plain block YAML that any YAML 1.1 or 1.2 loader reads back to the same values:
mappings and sequences in block style (empty ones as `{}` / `[]`), every string double-quoted with
escapes for anything not printable, keys plain only when they are identifiers that no YAML version
reads as anything but a string, floats always with a dot (`1.0e-05`, `.inf`, `.nan`), `true`,
`false`, `null`. Standard library only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

HEADER = "# kai-train run config: the run statement's `config`, rendered by attest.runconfig.render_yaml\n"
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# plain words some YAML version reads as a boolean or null
_RESERVED = {"y", "n", "yes", "no", "true", "false", "on", "off", "null"}
_SHORT = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}  # escapes YAML and JSON share


def render_yaml(config: Mapping[str, Any]) -> str:
    """The canonical YAML text of `config` (a JSON-like mapping); TypeError for any other value."""
    if not isinstance(config, Mapping):
        raise TypeError(f"a run config is a mapping, not {type(config).__name__}")
    lines: list[str] = []
    if config:
        _mapping(config, 0, lines)
    else:
        lines.append("{}")
    return HEADER + "".join(line + "\n" for line in lines)


def _mapping(d: Mapping[str, Any], indent: int, lines: list[str]) -> None:
    pad = " " * indent
    for k in sorted(d, key=_sort_key):
        v, key = d[k], _key(k)
        if isinstance(v, Mapping) and v:
            lines.append(f"{pad}{key}:")
            _mapping(v, indent + 2, lines)
        elif isinstance(v, list) and v:
            lines.append(f"{pad}{key}:")
            _sequence(v, indent + 2, lines)
        else:
            lines.append(f"{pad}{key}: {_scalar(v)}")


def _sequence(items: list[Any], indent: int, lines: list[str]) -> None:
    pad = " " * indent
    for it in items:
        if (isinstance(it, Mapping) or isinstance(it, list)) and it:
            sub: list[str] = []
            if isinstance(it, Mapping):
                _mapping(it, indent + 2, sub)
            else:
                _sequence(it, indent + 2, sub)
            sub[0] = pad + "- " + sub[0][indent + 2:]  # the first entry goes on the dash's line
            lines.extend(sub)
        else:
            lines.append(f"{pad}- {_scalar(it)}")


def _sort_key(k: Any) -> str:
    if not isinstance(k, str):
        raise TypeError(f"a run config key must be a string, not {type(k).__name__} {k!r}")
    return k


def _key(k: Any) -> str:
    if not isinstance(k, str):
        raise TypeError(f"a run config key must be a string, not {type(k).__name__} {k!r}")
    return k if _PLAIN_KEY.fullmatch(k) and k.lower() not in _RESERVED else _quote(k)


def _scalar(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return _float(v)
    if isinstance(v, str):
        return _quote(v)
    if isinstance(v, Mapping) and not v:
        return "{}"
    if isinstance(v, list) and not v:
        return "[]"
    raise TypeError(f"a run config value must be a mapping, list, string, number, bool or null, not {type(v).__name__}")


def _float(f: float) -> str:
    if math.isnan(f):
        return ".nan"
    if math.isinf(f):
        return ".inf" if f > 0 else "-.inf"
    r = repr(f)
    if "e" in r:
        mantissa, exp = r.split("e")
        return f"{mantissa if '.' in mantissa else mantissa + '.0'}e{exp}"  # repr's exponent carries its sign
    return r if "." in r else r + ".0"


def _quote(s: str) -> str:
    out = []
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif c.isprintable():
            out.append(c)
        elif c in _SHORT:
            out.append(_SHORT[c])
        else:
            code = ord(c)
            out.append(f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
    return '"' + "".join(out) + '"'
