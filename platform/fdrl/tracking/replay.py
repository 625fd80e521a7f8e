"""Ship what a tracker's spool still holds, e.g. after its process ended while MLflow was down.

    python -m fdrl.tracking.replay SPOOL_DIR [--tracking-uri URI] [--timeout SECONDS]

prints the run id once everything is shipped. Records already shipped are skipped (the
spool's state file says which), and resending the one batch a killed shipper may have left
unacknowledged adds nothing (see :mod:`fdrl.tracking.shipper`).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from fdrl.tracking.shipper import BLOCKED, DOWN, IDLE, Shipper, describe
from fdrl.tracking.spool import JOURNAL, Spool


class ReplayError(RuntimeError):
    """The spool could not be shipped completely."""


def replay(spool_dir: str | Path, tracking_uri: str | None = None, timeout: float | None = None,
           max_backoff_s: float = 15.0) -> str:
    """Ship the spool at ``spool_dir`` to ``tracking_uri`` (default: the URI its tracker used);
    returns the run id. Retries while MLflow is unreachable, for up to ``timeout`` seconds
    (None: no limit). Raises SpoolError if a live tracker owns the spool, ReplayError if
    MLflow refused the run or ``timeout`` passed with records left."""
    from fdrl.tracking.backend import set_fast_fail_env

    spool_dir = Path(spool_dir)
    if not (spool_dir / JOURNAL).is_file():
        raise FileNotFoundError(f"{spool_dir} is not a tracking spool (no {JOURNAL})")
    spool = Spool(spool_dir)
    try:
        shipper = Shipper(spool, tracking_uri, max_backoff_s=max_backoff_s)
        set_fast_fail_env(shipper.uri())
        deadline = None if timeout is None else time.monotonic() + timeout
        backoff = shipper.min_backoff_s
        while True:
            status = shipper.step()
            if status == IDLE:
                return spool.run_id
            if status == BLOCKED:
                raise ReplayError(f"{shipper.blocked}; spool {spool.path} is kept")
            if status == DOWN:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise ReplayError(f"{describe(spool.pending())} not shipped within {timeout:g}s: "
                                      f"MLflow at {shipper.uri()} unreachable; spool {spool.path} is kept")
                time.sleep(backoff if left is None else min(backoff, left))  # retry delay
                backoff = min(backoff * 2, max_backoff_s)
            else:
                backoff = shipper.min_backoff_s
    finally:
        spool.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fdrl.tracking.replay", description=__doc__.split("\n\n")[0])
    p.add_argument("spool_dir")
    p.add_argument("--tracking-uri", help="default: the URI the spool's tracker used")
    p.add_argument("--timeout", type=float, default=None,
                   help="give up after this many seconds while MLflow is unreachable (default: never)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run_id = replay(args.spool_dir, args.tracking_uri, args.timeout)
    except (ReplayError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(run_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
