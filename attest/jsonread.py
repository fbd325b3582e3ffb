"""The one strict JSON reader for everything the verifier reads: chain lines, DSSE payloads (in-toto
statements), data-shard manifests, OMS signature files, safetensors headers, export/config.json
and policies.

Every file the verifier reads came from someone else, so `loads` parses a strict subset of JSON
(in the spirit of I-JSON, RFC 7493) and never lets Python's own limits surface as a crash:

- the input is at most `max_bytes` bytes of UTF-8;
- an object may not repeat a key (a chain line with `dsseEnvelope` twice, a forged one first and the
  honest one last, is refused instead of silently keeping the last);
- integers lie in [-(2^64 - 1), 2^64 - 1] (`MAX_INT`); a longer digit string is refused before it is
  converted, so a 100,000-digit number never reaches the interpreter's int-conversion limit;
- numbers are finite: `NaN`, `Infinity`, `-Infinity` and overflowing literals such as `1e999` are
  refused;
- strings hold no lone surrogate escape (`"\\ud800"`), which no UTF-8 output can carry;
- containers nest at most `max_depth` deep (the default is far below the interpreter's recursion
  limit, and a recursion error while parsing is reported as the same problem).

Cost: the C parser does the work; only the duplicate-key check runs in Python (once per object).
The number hooks run only when a byte scan finds a literal that could be out of range, and depth is
measured by a byte scan (numpy) only when the text has more brackets than the limit. A 64 MiB input
parses in a few seconds (bench/hostile_bounds.py, docs/threat-model.md "Hostile input").

Failures raise `JsonReadError` (a ValueError) whose message starts with the file name given as
`where` and, where one is known, the field. `field` and the small typed accessors give checks and
readers the same kind of message for a value of the wrong type.
"""

from __future__ import annotations

import json
import re
from typing import Any

from attest.errors import KaiError

MAX_INT = (1 << 64) - 1  # covers int64 and uint64 (seeds, sizes); anything larger is refused
MAX_INT_DIGITS = len(str(MAX_INT))  # 20: a longer literal is refused before int() sees it
DEFAULT_MAX_DEPTH = 64  # statements nest about 8 deep; a policy or manifest a little less
DEFAULT_MAX_BYTES = 64 << 20
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class JsonReadError(KaiError, ValueError):
    """A JSON input the verifier refuses; the message names the file and, where known, the field."""


class _Refused(KaiError, ValueError):
    """Raised inside the parser's hooks; turned into a JsonReadError naming the file."""


def _int(s: str) -> int:
    digits = s[1:] if s.startswith("-") else s
    if len(digits) > MAX_INT_DIGITS:
        raise _Refused(f"integer of {len(digits)} digits (the limit is {MAX_INT_DIGITS})")
    n = int(s)
    if abs(n) > MAX_INT:
        raise _Refused(f"integer {s} outside ±{MAX_INT}")
    return n


def _float(s: str) -> float:
    x = float(s)
    if x in (float("inf"), float("-inf")):
        raise _Refused(f"number {s[:40]} overflows a double")
    return x


def _constant(s: str) -> Any:
    raise _Refused(f"{s} is not JSON (numbers must be finite)")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _Refused(f"duplicate key {k[:80]!r}")
            seen.add(k)
    return d


# Numbers: digits map to "0", exponent letters to "e", signs to "+", so that two substring tests
# find a literal that might be outside the integer bound or overflow a double (a run of 20 or more
# digits, or an exponent of three digits or more). Without one, the C parser's own conversions are
# safe and the (slower) per-number hooks are not used.
_NUMBER_SHAPE = bytes.maketrans(b"0123456789Ee-", b"0000000000ee+")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_KEEP_NESTING = bytes(c for c in range(256) if c not in b'[]{}"')


def _big_number(raw: bytes) -> bool:
    shape = raw.translate(_NUMBER_SHAPE)
    return b"0" * 20 in shape or b"e000" in shape or b"e+000" in shape


def _depth(raw: bytes) -> int:
    """Deepest nesting of valid JSON text `raw`, in C and numpy passes: escaped backslashes and
    quotes are dropped, so every remaining quote opens or closes a string; brackets inside strings
    (an odd number of quotes before them) do not count."""
    import numpy as np

    marks = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _KEEP_NESTING)
    a = np.frombuffer(marks, dtype=np.uint8)
    outside = np.cumsum(a == ord('"')) % 2 == 0
    steps = np.zeros(len(a), dtype=np.int32)
    steps[((a == ord("[")) | (a == ord("{"))) & outside] = 1
    steps[((a == ord("]")) | (a == ord("}"))) & outside] = -1
    return int(np.cumsum(steps).max(initial=0))


def _surrogate_path(obj: Any) -> str:
    """Where the first lone surrogate of `obj` is (slow; only run once one is known to exist)."""
    stack: list[tuple[Any, str]] = [(obj, "")]
    while stack:
        x, path = stack.pop()
        if isinstance(x, str):
            if _SURROGATE.search(x):
                return f"{path or 'a string'}: a lone surrogate escape in a string"
        elif isinstance(x, dict):
            for k, v in x.items():
                if _SURROGATE.search(k):
                    return f"{path or 'an object'}: a lone surrogate escape in a key"
                stack.append((v, f"{path}.{k}" if path else k))
        elif isinstance(x, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(x))
    return "a lone surrogate escape"


def loads(data: bytes | str, where: str, max_bytes: int = DEFAULT_MAX_BYTES,
          max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Parse `data` strictly (see the module docstring); JsonReadError names `where`."""
    if len(data) > max_bytes:
        raise JsonReadError(f"{where}: {len(data)} bytes exceed the {max_bytes}-byte limit")
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JsonReadError(f"{where}: not UTF-8 text (byte {e.start})") from None
    hooks: dict[str, Any] = {"object_pairs_hook": _pairs, "parse_constant": _constant}
    if _big_number(raw):
        hooks.update(parse_int=_int, parse_float=_float)
    try:
        obj = json.loads(text, **hooks)
    except _Refused as e:
        raise JsonReadError(f"{where}: {e}") from None
    except json.JSONDecodeError as e:
        raise JsonReadError(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise JsonReadError(f"{where}: nested deeper than {max_depth} levels") from None
    except ValueError as e:  # anything else the decoder raises (it never should)
        raise JsonReadError(f"{where}: not valid JSON ({str(e)[:200]})") from None
    if isinstance(obj, (dict, list)) and raw.count(b"[") + raw.count(b"{") > max_depth and _depth(raw) > max_depth:
        raise JsonReadError(f"{where}: nested deeper than {max_depth} levels")
    if _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise JsonReadError(f"{where}: {_surrogate_path(obj)}") from None
    return obj


def load_file(path: Any, max_bytes: int = DEFAULT_MAX_BYTES, max_depth: int = DEFAULT_MAX_DEPTH,
              where: str | None = None, root: Any = None) -> Any:
    """Read (through the door, attest.inputs: a regular file, refused before reading when it is
    larger than `max_bytes`; inside `root` when given) and parse a file."""
    from attest import inputs

    label = where or str(path)
    try:
        data = inputs.read_bytes(path, max_bytes, root=root, where=label)
    except inputs.InputError as e:
        raise JsonReadError(str(e)) from None
    return loads(data, label, max_bytes, max_depth)


_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
               bool: "true or false", type(None): "null"}


def type_name(x: Any) -> str:
    """How a JSON value's type reads in an error message."""
    for t, name in ((bool, "true or false"), (type(None), "null"), (dict, "an object"), (list, "a list"),
                    (str, "a string"), (int, "an integer"), (float, "a number")):
        if isinstance(x, t):
            return name
    return type(x).__name__


def field(obj: Any, name: str, kind: type | tuple[type, ...], where: str, path: str = "",
          required: bool = True, default: Any = None) -> Any:
    """`obj[name]`, checked to be of `kind` (bool is never an int here); JsonReadError names `where`
    and the dotted field path. A missing optional field gives `default`."""
    full = f"{path}.{name}" if path else name
    if not isinstance(obj, dict):
        raise JsonReadError(f"{where}: `{path or 'the document'}` must be an object, found {type_name(obj)}")
    if name not in obj:
        if required:
            raise JsonReadError(f"{where}: field `{full}` is missing")
        return default
    v = obj[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        want = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
        raise JsonReadError(f"{where}: field `{full}` must be {want}, found {type_name(v)}")
    return v


def str_list(obj: Any, name: str, where: str, path: str = "", required: bool = True) -> list[str] | None:
    """A field that must be a list of strings."""
    v = field(obj, name, list, where, path, required)
    if v is None:
        return None
    full = f"{path}.{name}" if path else name
    for i, x in enumerate(v):
        if not isinstance(x, str):
            raise JsonReadError(f"{where}: field `{full}[{i}]` must be a string, found {type_name(x)}")
    return v
