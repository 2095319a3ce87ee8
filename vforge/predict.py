"""``python -m vforge.predict``: implied volatilities from raw chain rows with a trained run's model.

The input goes through the same loader checks and feature code as training (``vforge.serving``), so a
prediction is exactly what the run's test metrics measured: the model re-marks a quote date's contracts
from their terms, the day's spot and the previous date's surface (``data.horizon=0``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import pandas as pd
from omegaconf import DictConfig

from vforge import CONF_DIR
from vforge.data.chain import read_table
from vforge.serving import load_run, run_options_note

log = logging.getLogger(__name__)


def predict(cfg: DictConfig) -> pd.DataFrame:
    """Predicted IV levels (decimal) for one quote date of ``cfg.input``, written to ``cfg.output``.

    ``cfg.run`` is a run folder, a model.pt, ``runs:/<id>``, or a registered model ``models:/<name>@<alias>``
    (``models:/<name>/<version>``), which is loaded as the MLflow pyfunc model that training registered.
    """
    chain = load_run(cfg.run, cfg.get("tracking_uri"))
    data_cfg = chain.data_cfg  # the input is read as the run read its training chains
    with run_options_note():
        raw = read_table(cfg.input, read_options=dict(data_cfg.get("read_options") or {}),
                         quote_date_from_path=data_cfg.get("quote_date_from_path"), path_option="input")
    remark = chain.remark(raw, cfg.date)
    out = remark.ivs
    output = Path(cfg.output) if cfg.output else Path(cfg.input).with_suffix(".iv.csv")
    output.parent.mkdir(parents=True, exist_ok=True)
    out.to_parquet(output, index=False) if output.suffix == ".parquet" else out.to_csv(output, index=False)
    log.info("%d of %d contracts re-marked on %s from the %s surface of %s -> %s (%d without a previous quote; "
             "dropped: %s)", len(out), remark.contracts, remark.date.date(), remark.previous_from,
             remark.previous_date.date(), output, int(out["new_contract"].sum()), remark.dropped or "none")
    return out


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
