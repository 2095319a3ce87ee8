"""Property-based fuzzing of the chain loader: any mutation of a valid chain ends in a named vforge error or in a
dataset that adds up (see tests/fuzz.py for the mutations and the oracle).

The fast suite draws a few dozen cases; ``pytest -m slow tests/test_fuzz.py`` runs 1,000.
``python scripts/fuzz_chains.py 300`` prints the table of outcomes for seeded cases.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import MUTATIONS, make_case, run_case

cases = st.tuples(
    st.integers(0, 2**32 - 1),
    st.lists(st.sampled_from(sorted(MUTATIONS)), min_size=1, max_size=3),
    st.sampled_from(["iv", "price"]),
    st.sampled_from(["csv", "parquet"]),
)


def check(case_args) -> None:
    seed, names, kind, fmt = case_args
    case = make_case(seed, names, kind, fmt)
    logging.disable(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            outcome, detail = run_case(case, Path(tmp))
    finally:
        logging.disable(logging.NOTSET)
    assert outcome in ("named", "accepted"), f"{'+'.join(case.names)} {case.options}: {outcome}: {detail}"


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(cases)
def test_fuzzed_chains_end_in_a_named_error_or_add_up(case_args):
    check(case_args)


@pytest.mark.slow
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases)
def test_fuzzed_chains_1000_cases(case_args):
    check(case_args)


def test_the_oracle_catches_what_the_loader_let_through(tmp_path):
    """The oracle is not vacuous: a clean chain with 30 IVs silently x100 after loading is judged wrong."""
    from tests.fuzz import baseline, check_accepted, clean_chain, load_options
    from vforge.data import chain as C

    case = make_case(0, ["shuffle"], "iv", "csv")
    path = tmp_path / "c.csv"
    clean_chain("iv").to_csv(path, index=False)
    ds = C.load(**load_options(str(path)))
    ds.train.iv = ds.train.iv.copy()
    ds.train.iv[:30] *= 100
    problems = check_accepted(ds, case, baseline("iv", tmp_path))
    assert any("target IV outside" in p for p in problems) and any("another IV" in p for p in problems)
    ds.report["loaded"] += 1
    assert any("rows loaded" in p for p in check_accepted(ds, case, baseline("iv", tmp_path)))
