"""How `kai-train` and `kai-data` run as Hydra apps (torch-free; data_pipelines.build uses it too).

- Configs come from the installed package (`pkg://kai_train.conf`), typed by kai_train.conf.schema;
  `--config-dir DIR` puts a user's folder in front.
- The `deepspeed` launcher's `--local_rank N` / `--local_rank=N` is taken off the command line
  into LOCAL_RANK (torchrun sets LOCAL_RANK itself).
- A config error (`seed=abc`, an unknown key, a missing preset) ends with one line
  `APP: error: ...` on stderr and exit status 2; a failure the task raises (any `KaiError`, `AppError`
  among them, and the error types the app adds) with one line and status 1. Under torchrun the same message goes to the
  rank's error file, so torchrun's summary names it. Anything else is a bug: its traceback is shown
  (`HYDRA_FULL_ERROR=1` shows Hydra's own tracebacks too).
- Multirun (`-m`): each job works in its own folder, `<run dir>/<job number>` (hydra.sweep in the
  app's YAML), every failed job is reported with its overrides as it ends, the sweep goes on, and
  the exit status is 1 when any job failed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from attest.errors import KaiError
from kai_train.conf.schema import register

CONFIG_PATH = "pkg://kai_train.conf"
_META = ("full_key:", "object_type=", "reference_type=", "To append to your config")


class AppError(KaiError):
    """A failure the user can fix: the message is one line naming the file or key and the problem."""


def take_local_rank(argv: list[str]) -> list[str]:
    """`argv` without the `deepspeed` launcher's `--local_rank N` / `--local_rank=N` (also spelt
    `--local-rank`); its value goes to LOCAL_RANK unless the launcher already set it."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        name, eq, value = a.partition("=")
        if name in ("--local_rank", "--local-rank"):
            if not eq:
                value = argv[i + 1] if i + 1 < len(argv) else ""
                i += 1
            if value:
                os.environ.setdefault("LOCAL_RANK", value)
        else:
            out.append(a)
        i += 1
    return out


def say(line: str) -> None:
    """`line` on stderr in one write: under torchrun (`python -u`) every rank prints its error at once,
    and print's separate write of the newline would let another rank's line in between."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def one_line(e: BaseException) -> str:
    """An exception and the config error beneath it as one line, without OmegaConf's key/type notes."""
    parts = []
    for x in (e, e.__cause__):
        if x is None or (x is e.__cause__ and not isinstance(x, OmegaConfBaseException)):
            continue
        lines = [s.strip() for s in str(x).splitlines()]
        parts += [s.rstrip(".") if i == 0 else s for i, s in enumerate(lines) if s and not s.startswith(_META)]
    return ": ".join(parts[:1] + ["; ".join(parts[1:])] if len(parts) > 1 else parts) or type(e).__name__


def _record_for_torchrun(message: str) -> None:
    """Under torchrun, the rank's error file gets the message (torchrun's summary prints it)."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        try:  # raised here so that the file's traceback is this one line, not Hydra's frames
            raise AppError(message) from None
        except AppError as e:
            ErrorHandler().record_exception(e)


def run(app: str, config_name: str, task: Callable[[DictConfig], None], dir_key: str,
        errors: tuple[type[BaseException], ...] = ()) -> None:
    """Run `task` as the Hydra app `app` (config `config_name`); `dir_key` names the config key
    that holds the run folder (a multirun job's becomes its own)."""
    register()
    known = (KaiError, *errors)
    failed: list[BaseException] = []
    jobs = [0]

    def job(cfg: DictConfig) -> None:
        hc = HydraConfig.get()
        multirun = hc.mode == RunMode.MULTIRUN
        if multirun:
            cfg[dir_key] = hc.runtime.output_dir
        jobs[0] += 1
        try:
            task(cfg)
        except known as e:
            where = f" in job {hc.job.num} ({' '.join(hc.overrides.task) or 'no overrides'}, {cfg[dir_key]})" if multirun else ""
            say(f"{app}: error{where}: {one_line(e)}")
            failed.append(e)
            if multirun:
                raise  # Hydra marks the job failed and goes on with the next

    sys.argv = take_local_rank(sys.argv)
    main = hydra.main(config_path=CONFIG_PATH, config_name=config_name, version_base=None)(job)
    full = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra's errors reach this function, which words them
    outcome: tuple[str, int] | None = None
    try:
        main()
        if failed:  # a single run's error, already printed as its one line
            outcome = one_line(failed[0]), 1
    except Exception as e:
        if full:
            raise
        if any(e is f for f in failed):  # a multirun: each failed job has printed its line
            outcome = f"{len(failed)} of {jobs[0]} multirun jobs failed", 1
        elif isinstance(e, (HydraException, OmegaConfBaseException)):
            outcome = one_line(e), 2
        else:
            raise
        if outcome[1] == 2 or jobs[0] > 1:
            say(f"{app}: error: {outcome[0]}")
    finally:
        if full is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
    if outcome is not None:
        _record_for_torchrun(outcome[0])
        raise SystemExit(outcome[1])
