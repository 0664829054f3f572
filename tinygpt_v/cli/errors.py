"""Expected failures end a command in one line on stderr and a non-zero exit status.

Status 2: the config is wrong (ConfigError, with its dotted key and file); 1: something the run
could not get past (a weight file, a data folder, a full disk, a model that does not match its
checkpoint); 130: Ctrl-C. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import errno
import logging
import sys
from collections.abc import Callable
from typing import TextIO

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full_line(error: OSError, resume_hint: str = "") -> str:
    where = f" while writing {error.filename}" if error.filename else ""
    return f"error: the disk is full{where} ({error.strerror}){resume_hint}"


def run_reporting(body: Callable[[], int | None], expected: tuple[type[BaseException], ...] = (),
                  bad_input: tuple[type[BaseException], ...] = (), err: TextIO | None = None) -> int:
    """Run `body`; turn a ConfigError, a CheckpointError, a full disk and the `expected`
    exception types into one line on `err` and an exit status (`bad_input` types: status 2,
    as a config error: the user's input files are wrong)."""
    from ..checkpoints import CheckpointError
    from ..registry import ConfigError
    err = err or sys.stderr
    try:
        return body() or 0
    except ConfigError as e:
        print(f"config error: {e}", file=err)
        return 2
    except bad_input as e:
        print(f"error: {e}", file=err)
        return 2
    except (CheckpointError, OSError, *expected) as e:
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            print(disk_full_line(e), file=err)
            return 1
        if not isinstance(e, (CheckpointError, *expected)):
            raise
        print(f"error: {e}", file=err)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=err)
        return 130


def quiet_harmless_warnings() -> None:
    """Silence lines a CPU run would print that say nothing about the run: bitsandbytes' note
    that an optional CPU nf4 kernel package (`kernels`) is absent (logged when peft imports it),
    peft's call of a transformers helper that transformers 5 renamed, and DeepSpeed's "Setting
    accelerator to CPU" when it is imported on a machine without a GPU. Only these exact
    messages; call it before importing the models."""
    import warnings
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    deepspeed = logging.getLogger("DeepSpeed")  # deepspeed.utils.logging's; it keeps filters added before
    if not any(isinstance(f, _DropMessage) for f in deepspeed.filters):
        deepspeed.addFilter(_DropMessage("Setting accelerator to CPU."))


class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)
