"""scripts/thin_panels.py: parity forwards of a cut window against prices made from a known forward."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import thin_panels as T  # noqa: E402


def test_parity_forwards_recover_the_forward_the_prices_were_made_from():
    # C - P = exp(-rT) (F - K) at every strike, plus one torn pair far from the money that the five nearest
    # pairs leave out; a strike quoted as a call only has no pair.
    rows = []
    for date, expiry, forward in (("2020-01-02", "2020-02-26", 2.95), ("2020-01-02", "2020-03-25", 2.97),
                                  ("2020-01-03", "2020-02-26", 3.01)):
        tau = (pd.Timestamp(expiry) - pd.Timestamp(date)).days / 365
        for k in np.arange(2.6, 3.45, 0.05):
            put = 0.02 + max(k - forward, 0.0)
            call = put + np.exp(-T.RATE * tau) * (forward - k) + (0.3 if abs(k - 2.6) < 1e-9 else 0.0)
            rows += [(date, "C", expiry, round(k, 2), call), (date, "P", expiry, round(k, 2), put)]
        rows.append((date, "C", expiry, 3.5, 0.01))
    chain = pd.DataFrame(rows, columns=["trade_date", "cp", "expiry", "strike", "close"])
    got = pd.Series(T.parity_forwards(chain)).groupby([chain["trade_date"], chain["expiry"]]).agg(["min", "max"])
    want = {("2020-01-02", "2020-02-26"): 2.95, ("2020-01-02", "2020-03-25"): 2.97, ("2020-01-03", "2020-02-26"): 3.01}
    assert got["min"].to_dict() == pytest.approx(want) and got["max"].to_dict() == pytest.approx(want)
