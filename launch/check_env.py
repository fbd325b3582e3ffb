"""Check a node's environment before `torchrun` starts kai-train; one line per check.

    python launch/check_env.py              # the launch scripts run this on every node first
    python launch/check_env.py --first-host # print the first host of $SLURM_JOB_NODELIST

Each line is `ok`, `warn` or `error`, the check's name, and what was found with what to do about
it. Exit 1 when any check is an error (training would fail or hang), else 0. Reads the same
variables the launch scripts use: NPROC, NNODES, MASTER_ADDR, MASTER_PORT, DS_ACCELERATOR,
SLURM_NNODES, SLURM_JOB_NODELIST and NCCL_* / GLOO_SOCKET_IFNAME.

Standard library only at import; torch is imported inside its check so a broken install is
reported as a finding rather than a traceback.
"""

from __future__ import annotations

import importlib.metadata
import ipaddress
import os
import re
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

OK, WARN, ERROR = "ok", "warn", "error"


@dataclass(frozen=True)
class Finding:
    level: str  # ok | warn | error
    check: str
    message: str

    def line(self) -> str:
        return f"{self.level:<5} {self.check}: {self.message}"


Env = Mapping[str, str]


# ---------------------------------------------------------------------------------------------
# SLURM host lists


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list as `scontrol show hostnames` does.

    'gpu[01-03,07],login1' -> gpu01 gpu02 gpu03 gpu07 login1; zero padding is kept, and several
    bracket groups in one name expand as a product ('r[1-2]n[1-2]' -> r1n1 r1n2 r2n1 r2n2).
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        hosts.extend(_expand_one(item))
    return hosts


def _split_top_level(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        if depth < 0:
            raise ValueError(f"unbalanced ']' in host list {s!r}")
        cur += ch
    if depth:
        raise ValueError(f"unbalanced '[' in host list {s!r}")
    parts.append(cur)
    return [p for p in parts if p]


def _expand_one(item: str) -> list[str]:
    m = re.match(r"^([^\[]*)\[([^\]]*)\](.*)$", item)
    if not m:
        return [item]
    prefix, ranges, rest = m.groups()
    out = []
    for r in ranges.split(","):
        lo, _, hi = r.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"bad range {r!r} in host list item {item!r}")
        width = len(lo)
        for i in range(int(lo), int(hi or lo) + 1):
            out.extend(_expand_one(f"{prefix}{i:0{width}d}{rest}"))
    return out


# ---------------------------------------------------------------------------------------------
# checks: each takes the environment and returns findings


def check_python(env: Env) -> list[Finding]:
    if sys.version_info < (3, 10):
        return [Finding(ERROR, "python", f"Python {sys.version.split()[0]} is too old: kai-train needs 3.10+")]
    return [Finding(OK, "python", sys.version.split()[0])]


def _torch_cuda() -> tuple[object | None, int, str]:
    """(torch module or None, CUDA device count, error text)."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure is a finding
        return None, 0, f"{type(e).__name__}: {e}"
    return torch, (torch.cuda.device_count() if torch.cuda.is_available() else 0), ""


def check_torch_and_accelerator(env: Env) -> list[Finding]:
    torch, n_gpu, err = _torch_cuda()
    if torch is None:
        return [Finding(ERROR, "torch", f"cannot import torch ({err}): install the train extra, "
                        "`pip install -e '.[train]'` (make install does it)")]
    out = [Finding(OK, "torch", f"{torch.__version__}")]  # type: ignore[attr-defined]
    try:
        out.append(Finding(OK, "deepspeed", importlib.metadata.version("deepspeed")))
    except importlib.metadata.PackageNotFoundError:
        out.append(Finding(ERROR, "deepspeed", "not installed: `pip install -e '.[train]'`"))
    cpu_mode = env.get("DS_ACCELERATOR") == "cpu"
    if n_gpu:
        cuda = torch.version.cuda  # type: ignore[attr-defined]
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001
            nccl = None
        out.append(Finding(OK, "cuda", f"{n_gpu} GPU(s), CUDA {cuda}"))
        out.append(Finding(OK, "nccl", nccl) if nccl else
                   Finding(ERROR, "nccl", "torch was built without NCCL: install a CUDA build of torch"))
        if cpu_mode:
            out.append(Finding(WARN, "accelerator", f"DS_ACCELERATOR=cpu with {n_gpu} GPU(s) present: "
                               "training runs on CPU with gloo; unset DS_ACCELERATOR to use the GPUs"))
    elif cpu_mode:
        out.append(Finding(OK, "accelerator", "no GPU; DS_ACCELERATOR=cpu: CPU ranks with gloo"))
    else:
        build = "a CPU-only torch build" if torch.version.cuda is None else "no CUDA device visible"  # type: ignore[attr-defined]
        out.append(Finding(WARN, "accelerator", f"{build}: for a CPU run export DS_ACCELERATOR=cpu "
                           "(gloo backend); for GPUs check the driver, CUDA_VISIBLE_DEVICES and the torch build"))
    return out


def check_nproc(env: Env) -> list[Finding]:
    raw = env.get("NPROC")
    if raw is None:
        return []
    if not raw.isdigit() or int(raw) < 1:
        return [Finding(ERROR, "nproc", f"NPROC={raw!r} is not a positive integer")]
    nproc = int(raw)
    _, n_gpu, _ = _torch_cuda()
    if env.get("DS_ACCELERATOR") == "cpu" or not n_gpu:
        cores = os.cpu_count() or 1
        if nproc > cores:
            return [Finding(WARN, "nproc", f"NPROC={nproc} CPU ranks on {cores} cores: ranks will contend; "
                            f"use NPROC<={cores}")]
        return [Finding(OK, "nproc", f"{nproc} CPU rank(s) on {cores} cores")]
    if nproc > n_gpu:
        return [Finding(ERROR, "nproc", f"NPROC={nproc} but only {n_gpu} GPU(s) visible: set NPROC={n_gpu} "
                        "or fix CUDA_VISIBLE_DEVICES")]
    if nproc < n_gpu:
        return [Finding(WARN, "nproc", f"NPROC={nproc} leaves {n_gpu - nproc} of {n_gpu} GPU(s) idle")]
    return [Finding(OK, "nproc", f"{nproc} rank(s), one per GPU")]


def _local_addresses() -> set[str]:
    addrs = {"127.0.0.1", "::1", "0.0.0.0", "localhost"}
    for name in {socket.gethostname(), socket.getfqdn()}:
        addrs.add(name)
        try:
            addrs.update(info[4][0] for info in socket.getaddrinfo(name, None))
        except OSError:
            pass
    return addrs


def _is_this_host(addr: str, resolved: set[str]) -> bool:
    local = _local_addresses()
    if addr in local or resolved & local:
        return True
    def loopback(a: str) -> bool:
        try:
            return ipaddress.ip_address(a.split("%")[0]).is_loopback  # drop an IPv6 zone (%eth0)
        except ValueError:
            return False

    return any(loopback(a) for a in resolved)


def check_master(env: Env) -> list[Finding]:
    """MASTER_ADDR resolves; MASTER_PORT is a port, and free here when this host is the master."""
    out: list[Finding] = []
    addr = env.get("MASTER_ADDR")
    resolved: set[str] = set()
    if addr:
        try:
            resolved = {info[4][0] for info in socket.getaddrinfo(addr, None)}
            out.append(Finding(OK, "master-addr", f"{addr} -> {', '.join(sorted(resolved))}"))
        except OSError as e:
            return [Finding(ERROR, "master-addr", f"MASTER_ADDR={addr} does not resolve ({e.strerror}): use the "
                            "first node's hostname or IP as the other nodes see it")]
    port_raw = env.get("MASTER_PORT")
    if port_raw is None:
        return out
    if not port_raw.isdigit() or not 1 <= int(port_raw) <= 65535:
        return out + [Finding(ERROR, "master-port", f"MASTER_PORT={port_raw!r} is not a port number (1-65535)")]
    port = int(port_raw)
    if addr and not _is_this_host(addr, resolved):
        return out + [Finding(OK, "master-port", f"{port} (hosted by {addr}, not this host: not probed)")]
    busy = _port_busy(port)
    if busy:
        return out + [Finding(ERROR, "master-port", f"port {port} is already in use on this host ({busy}): another "
                              f"job or a leftover torchrun holds it; pick a free one, e.g. MASTER_PORT={_free_port()}")]
    return out + [Finding(OK, "master-port", f"{port} is free on this host")]


def _port_busy(port: int) -> str:
    """'' if a listening socket could bind `port` on all interfaces here, else the OS's reason."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's TCPStore does
        try:
            s.bind(("0.0.0.0", port))
            s.listen(1)
        except OSError as e:
            return e.strerror or str(e)
    return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def check_nodes(env: Env) -> list[Finding]:
    """NNODES (what torchrun is told), SLURM_NNODES and the SLURM host list agree."""
    out: list[Finding] = []
    counts: dict[str, int] = {}
    for var in ("NNODES", "SLURM_NNODES"):
        raw = env.get(var)
        if raw is None:
            continue
        # torchrun accepts MIN:MAX for elastic jobs; compare the maximum
        top = raw.rpartition(":")[2]
        if not top.isdigit() or int(top) < 1:
            return [Finding(ERROR, "nodes", f"{var}={raw!r} is not a node count")]
        counts[var] = int(top)
    if env.get("SLURM_JOB_NODELIST"):
        try:
            counts["SLURM_JOB_NODELIST"] = len(expand_nodelist(env["SLURM_JOB_NODELIST"]))
        except ValueError as e:
            out.append(Finding(WARN, "nodes", f"cannot parse SLURM_JOB_NODELIST: {e}"))
    if len(set(counts.values())) > 1:
        said = ", ".join(f"{k}={v}" for k, v in counts.items())
        return out + [Finding(ERROR, "nodes", f"node counts disagree ({said}): the rendezvous waits for nodes "
                              "that never come; set NNODES to the number of nodes in the allocation")]
    if counts:
        out.append(Finding(OK, "nodes", f"{next(iter(counts.values()))} node(s)"))
    return out


def _interfaces() -> set[str]:
    try:
        return {name for _, name in socket.if_nameindex()}
    except OSError:
        return set()


def _check_ifname(var: str, value: str) -> Finding:
    """NCCL/GLOO interface lists: 'eth' (prefix), '=eth0' (exact), '^docker,lo' (exclude)."""
    names = _interfaces()
    if value.startswith("^"):
        return Finding(OK, "ifname", f"{var}={value} (exclusion list)")
    exact = value.startswith("=")
    wanted = [w for w in value.lstrip("=").split(",") if w]
    match = [w for w in wanted if any(n == w if exact else n.startswith(w) for n in names)]
    if not match:
        return Finding(ERROR, "ifname", f"{var}={value} matches no network interface on this host "
                       f"(have: {', '.join(sorted(names)) or 'none'}): set it to the interface that "
                       "reaches the other nodes, or unset it")
    return Finding(OK, "ifname", f"{var}={value} matches {', '.join(match)}")


def check_nccl_vars(env: Env) -> list[Finding]:
    out: list[Finding] = []
    cpu_mode = env.get("DS_ACCELERATOR") == "cpu"
    nccl = sorted(k for k in env if k.startswith("NCCL_"))
    if cpu_mode and nccl:
        out.append(Finding(WARN, "nccl-env", f"{', '.join(nccl)} set, but CPU runs use gloo: they have no "
                           "effect (GLOO_SOCKET_IFNAME picks gloo's interface)"))
    if env.get("NCCL_IB_DISABLE") == "1":
        out.append(Finding(WARN, "nccl-env", "NCCL_IB_DISABLE=1: InfiniBand is off and inter-node traffic goes "
                           "over TCP sockets (much slower); unset it unless the cluster has no IB/RoCE"))
    if env.get("NCCL_P2P_DISABLE") == "1":
        out.append(Finding(WARN, "nccl-env", "NCCL_P2P_DISABLE=1: GPU peer-to-peer (NVLink/PCIe) is off; "
                           "unset it unless it works around a known driver problem"))
    for old, new in (("NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_ASYNC_ERROR_HANDLING"),
                     ("NCCL_BLOCKING_WAIT", "TORCH_NCCL_BLOCKING_WAIT")):
        if old in env:
            out.append(Finding(WARN, "nccl-env", f"{old} is deprecated in torch and ignored: use {new}"))
    if env.get("NCCL_DEBUG", "").upper() in ("INFO", "TRACE"):
        out.append(Finding(OK, "nccl-env", f"NCCL_DEBUG={env['NCCL_DEBUG']} (verbose logs on every rank)"))
    for var in ("GLOO_SOCKET_IFNAME",) if cpu_mode else ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"):
        if env.get(var):
            out.append(_check_ifname(var, env[var]))
    return out


CHECKS: tuple[Callable[[Env], list[Finding]], ...] = (
    check_python, check_torch_and_accelerator, check_nproc, check_master, check_nodes, check_nccl_vars,
)


def run_checks(env: Env) -> list[Finding]:
    return [f for check in CHECKS for f in check(env)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--first-host"]:
        nodelist = os.environ.get("SLURM_JOB_NODELIST", "")
        hosts = expand_nodelist(nodelist) if nodelist else []
        if not hosts:
            print("check_env: error: SLURM_JOB_NODELIST is empty (run inside a SLURM allocation)", file=sys.stderr)
            return 1
        print(hosts[0])
        return 0
    if argv:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    findings = run_checks(os.environ)
    for f in findings:
        print(f.line())
    errors = sum(f.level == ERROR for f in findings)
    print(f"check_env: {errors} error(s), {sum(f.level == WARN for f in findings)} warning(s) on {socket.gethostname()}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
