"""torchrun with evoformer's failure report: ``python -m evoformer.torchrun [torchrun args]``.

The same launcher as ``python -m torch.distributed.run`` (``launch/torchrun.sh`` calls this), with
one difference: how a failed run reads. Plain torchrun ends every failure, a mistyped config key
included, with its ``ChildFailedError`` traceback and a ~20-line banner, and exits 1. Here:

- a user error (every failed worker exited 2, the others were stopped by the agent) reads as
  the one ``error: ...`` line the workers wrote to their torchelastic error files (each
  different line once, naming its ranks), and the launcher exits 2;
- any other failure is one line per failed rank (rank, exit status or signal, message) and
  exit 1;
- a signal the agent received (Ctrl-C, a scheduler's SIGTERM) ends quietly with 128 + signal,
  after the workers have saved: ``launch/torchrun.sh`` then reports the checkpoint.

It also sets ``OMP_NUM_THREADS=1`` when unset and several workers share the node, as torchrun
would, without torchrun's banner saying so.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from evoformer.errors import LAUNCHER_REPORTS, USER_ERROR_EXIT

_AGENT_LOGGER = "torch.distributed.elastic.multiprocessing.api"


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # Its "failed (exitcode: ...)" line repeats what the report below says.
    logging.getLogger(_AGENT_LOGGER).setLevel(logging.CRITICAL)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if str(args.nproc_per_node).isdigit() and int(args.nproc_per_node) > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ[LAUNCHER_REPORTS] = "1"  # the workers' error lines come back through us
    try:
        run(args)
    except ChildFailedError as failed:
        return report(
            {rank: (f.exitcode, f.message) for rank, f in failed.failures.items()}, sys.stderr
        )
    except SignalException as stopped:
        return 128 + int(stopped.sigval)
    return 0


def report(failures: dict[int, tuple[int, str]], out) -> int:
    """Write the failure report of ``{global rank: (exit status, message)}`` to ``out`` and
    return the launcher's exit status."""
    stopped_by_agent = -int(signal.SIGTERM)
    user = {r: m for r, (code, m) in failures.items() if code == USER_ERROR_EXIT}
    if user and all(code in (USER_ERROR_EXIT, stopped_by_agent) for code, _ in failures.values()):
        lines: dict[str, list[int]] = {}
        for rank in sorted(user):
            lines.setdefault(user[rank], []).append(rank)
        for line, ranks in lines.items():
            # The ranks are named only when they disagree (a file missing on one node).
            suffix = "" if len(lines) == 1 else f" (rank {', '.join(map(str, ranks))})"
            print(line + suffix, file=out)
        return USER_ERROR_EXIT
    for rank, (code, message) in sorted(failures.items()):
        if code == stopped_by_agent:
            continue  # stopped because another rank failed
        status = f"signal {-code}" if code < 0 else f"exit status {code}"
        print(f"error: rank {rank} failed ({status}): {message}", file=out)
    return 1


if __name__ == "__main__":
    sys.exit(main())
