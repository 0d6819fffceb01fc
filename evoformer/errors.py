"""The one error type a user can cause, and how it is reported."""

from __future__ import annotations

import json
import os
import sys
import time

USER_ERROR_EXIT = 2  # exit status of a user error, on every rank and from the launchers
# Exit status of a hung job (engine.watchdog): not a user error, since a hang is often a bad
# node or link, which a requeue on other nodes may not meet again.
HANG_EXIT = 3
# Set by ``evoformer.torchrun`` for its workers: it prints their error lines itself, once.
LAUNCHER_REPORTS = "EVOFORMER_LAUNCHER_REPORTS"


class UserError(Exception):
    """A mistake the user can fix (bad input, missing file, ...): printed as one line, exit 2."""


class TrainingDiverged(UserError):
    """Training stopped after ``train.nonfinite_patience`` non-finite steps in a row: one line
    naming the step and the newest (finite) checkpoint, exit status 2."""


class JobHung(UserError):
    """A rank made no progress for ``dist.timeout_s`` (a collective timed out, or the watchdog
    fired): one line naming the rank, step, phase or collective and the last complete
    checkpoint; exit status ``HANG_EXIT``."""


def report_user_error(err: UserError) -> int:
    """Print ``error: ...`` once per job and return the exit status. Under torchrun every rank
    hits the same mistake: each writes it to its torchelastic error file
    (``TORCHELASTIC_ERROR_FILE``), where ``evoformer.torchrun`` finds it and prints each distinct
    line once; under plain torchrun rank 0 prints it (and torchrun's summary shows the file)."""
    line = f"error: {err}"
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    written = False
    if error_file:
        try:
            with open(error_file, "w") as f:
                json.dump({"message": line, "timestamp": int(time.time())}, f)
            written = True
        except OSError:
            pass
    launcher_prints = written and os.environ.get(LAUNCHER_REPORTS) == "1"
    if not launcher_prints and (os.environ.get("RANK", "0") == "0" or not written):
        print(line, file=sys.stderr)
    return USER_ERROR_EXIT
