"""`make test`'s last lines: the two pytest runs' counts added up (the xdist run and the serial module).

Usage: python tests/_support/summary.py LOG EXIT_STATUS [LOG EXIT_STATUS ...]. Prints one line per run and
then ``total: N passed, N failed, N skipped``, or ``make test: FAILED ...`` when a run exited non-zero with
no failed test counted (a crash, an internal error, no tests) or printed no summary line.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# pytest's closing line, e.g. "1 failed, 576 passed, 2 skipped, 6 warnings in 690.84s (0:11:30)"
CLOSING = re.compile(r"^=*\s*((?:\d+ [a-z]+(?:, )?)+) in [\d.]+s\b")
COUNT = re.compile(r"(\d+) ([a-z]+)")


def closing_line(text: str) -> str | None:
    """The counts part of the last pytest closing line in ``text`` ("576 passed, 2 skipped"), or None."""
    lines = [m.group(1) for m in map(CLOSING.match, text.splitlines()) if m]
    return lines[-1] if lines else None


def counts_of(line: str) -> dict[str, int]:
    return {("error" if word == "errors" else word): int(n) for n, word in COUNT.findall(line)}


def main(argv: list[str]) -> int:
    runs = list(zip(argv[0::2], argv[1::2], strict=True))
    total = {"passed": 0, "failed": 0, "skipped": 0}
    broken = []
    for n, (log, status) in enumerate(runs, 1):
        line = closing_line(Path(log).read_text(errors="replace"))
        counts = counts_of(line or "")
        failed = counts.get("failed", 0) + counts.get("error", 0)
        print(f"run {n}: {line or 'no pytest summary line'} (exit status {status})")
        if line is None or (int(status) != 0 and failed == 0):
            broken.append(f"run {n} exited {status} with {line or 'no pytest summary line'}")
            continue
        total["passed"] += counts.get("passed", 0)
        total["failed"] += failed
        total["skipped"] += counts.get("skipped", 0)
    if broken:
        print("make test: FAILED (" + "; ".join(broken) + ")")
    else:
        print(f"total: {total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
