"""Load N seeded mutations of a valid chain and count the outcomes (see tests/fuzz.py for the oracle).

    python scripts/fuzz_chains.py [n_cases=300] [first_seed=0]

Prints one line per failing case (traceback or accepted-but-wrong) and a table:
named vforge error / accepted with drops counted / traceback / accepted but wrong.
"""

from __future__ import annotations

import collections
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/fuzz.py, run from anywhere

from tests.fuzz import make_case, run_case  # noqa: E402


def main(n: int = 300, first: int = 0) -> int:
    logging.disable(logging.WARNING)
    counts: collections.Counter = collections.Counter()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(first, first + n):
            case = make_case(seed)
            outcome, detail = run_case(case, Path(tmp))
            counts[outcome] += 1
            if outcome in ("traceback", "wrong"):
                print(f"seed {seed} {case.kind}/{case.fmt} {'+'.join(case.names)} {case.options}: {outcome}: {detail}")
    print(f"\n{n} fuzzed chains in {time.perf_counter() - start:.0f} s")
    print("named vforge error / accepted with drops counted / traceback / accepted but wrong")
    print(" / ".join(str(counts[k]) for k in ("named", "accepted", "traceback", "wrong")))
    return int(counts["traceback"] + counts["wrong"] > 0)


if __name__ == "__main__":
    sys.exit(main(*(int(a) for a in sys.argv[1:3])))
