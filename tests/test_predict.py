"""Predicting from raw chain rows reproduces, row for row, what the run's test metrics measured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from vforge.data.synthetic import generated
from vforge.export import load_serving
from vforge.predict import predict
from vforge.train import train

from .conftest import CONF_DIR, TINY_DATA


def raw_synthetic_chain(cfg) -> pd.DataFrame:
    return generated(**OmegaConf.to_container(cfg.data, resolve=True))


def run_predict(run, path, output=None, tracking_uri=None) -> pd.DataFrame:
    """``python -m vforge.predict run=... input=path`` in process."""
    return predict(OmegaConf.create({"run": str(run), "input": str(path), "output": None if output is None else str(output),
                                     "date": None, "tracking_uri": tracking_uri}))


def last_two_dates(cfg, path) -> None:
    """Write the raw synthetic chain's last two quote dates (the previous surface and the date to re-mark)."""
    raw = raw_synthetic_chain(cfg)
    raw[raw["quote_date"] >= raw["quote_date"].unique()[-2]].to_csv(path, index=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """One tiny run for the module (composed like ``make_cfg``, which is function-scoped)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["trainer=fast", "logger=none", *TINY_DATA],
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
        cfg.output_dir = str(tmp_path_factory.mktemp("run"))
        cfg.data.cache_dir = str(cache_dir)
    train(cfg)
    return cfg


def test_predict_matches_the_test_split_row_for_row(trained, tmp_path):
    cfg = trained
    ds = instantiate(cfg.data, _convert_="all")
    date = ds.test.rows["quote_date"].min()
    raw = raw_synthetic_chain(cfg)
    path = tmp_path / "chain.csv"
    raw[raw["quote_date"] <= date].to_csv(path, index=False)  # history up to the date, nothing after it
    out = run_predict(cfg.output_dir, path)
    assert Path(str(path).replace(".csv", ".iv.csv")).is_file()
    assert (out["quote_date"] == date).all() and len(out) > 0

    serving, _ = load_serving(Path(cfg.output_dir) / "model.pt")
    on_date = (ds.test.rows["quote_date"] == date).to_numpy()
    with torch.inference_mode():
        raw_out = serving.model(ds.test.x_num[on_date.copy()], None)[:, 0].numpy()
    # Dataset.to_level on the test split's own rows of that date: what test/rmse scored.
    expected = ds.test.rows[on_date].copy()
    expected["expected"] = raw_out * ds.y_scale + ds.y_center + (ds.test.base[on_date] if ds.target == "change" else 0)
    expected["expiry"] = pd.to_datetime(expected["expiry"])
    out["expiry"] = pd.to_datetime(out["expiry"])
    both = out.merge(expected, on=["expiry", "strike", "option_type"])
    assert len(both) == on_date.sum()  # every contract the test split scored on that date is predicted
    np.testing.assert_allclose(both["implied_volatility"], both["expected"], atol=2e-6)


def test_predict_needs_the_previous_date(trained, tmp_path):
    raw = raw_synthetic_chain(trained)
    path = tmp_path / "one_day.csv"
    raw[raw["quote_date"] == raw["quote_date"].max()].to_csv(path, index=False)
    with pytest.raises(ValueError, match="needs the previous date's chain"):
        run_predict(trained.output_dir, path)


def test_unquoted_contracts_are_re_marked_too(trained, tmp_path):
    raw = raw_synthetic_chain(trained)
    last = raw["quote_date"].max()
    chain = raw[raw["quote_date"] >= raw["quote_date"].unique()[-3]].copy()
    today = (chain["quote_date"] == last) & (chain["bid"] > 0)
    unquoted = today & (np.arange(len(chain)) % 2 == 0)
    chain.loc[unquoted, ["bid", "ask"]] = np.nan  # listed, but no quote today
    path = tmp_path / "partly_quoted.parquet"
    chain.to_parquet(path)
    out = run_predict(trained.output_dir, path, output=tmp_path / "iv.parquet")
    keys = ["expiry", "strike", "option_type"]
    got = out.merge(chain.loc[unquoted, keys], on=keys)
    assert len(got) > 0.9 * unquoted.sum()  # all but those the previous surface cannot reach
    assert np.isfinite(got["implied_volatility"]).all() and (got["implied_volatility"] > 0).all()
    assert pd.read_parquet(tmp_path / "iv.parquet").shape == out.shape


def test_an_mlflow_run_id_predicts_like_its_folder(make_cfg, mlflow_uri, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    cfg = make_cfg("logger=mlflow", f"logger.tracking_uri={mlflow_uri}", "logger.experiment=test-predict")
    train(cfg)
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("test-predict").experiment_id])
    path = tmp_path / "chain.csv"
    last_two_dates(cfg, path)
    ask = lambda run_ref: run_predict(run_ref, path, tmp_path / "iv.csv", mlflow_uri)  # noqa: E731
    from_mlflow, from_folder = ask(f"runs:/{run.info.run_id}"), ask(cfg.output_dir)
    pd.testing.assert_frame_equal(from_mlflow, from_folder)
    with pytest.raises(FileNotFoundError, match="could not fetch model/model.pt"):
        ask("runs:/0123456789abcdef0123456789abcdef")


def test_a_registered_model_predicts_from_raw_rows(make_cfg, mlflow_uri, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    cfg = make_cfg("logger=mlflow", f"logger.tracking_uri={mlflow_uri}", "logger.experiment=test-registry",
                   "logger.registered_model=vforge-test-iv")
    train(cfg)
    (version,) = [v.version for v in mlflow.MlflowClient(tracking_uri=mlflow_uri).search_model_versions(
        "name='vforge-test-iv'")]
    path = tmp_path / "chain.csv"
    last_two_dates(cfg, path)
    ask = lambda run_ref: run_predict(run_ref, path, tmp_path / "iv.csv", mlflow_uri)  # noqa: E731
    registered, folder = ask(f"models:/vforge-test-iv/{version}"), ask(cfg.output_dir)
    pd.testing.assert_frame_equal(registered.reset_index(drop=True), folder, check_dtype=False)


def test_predict_errors_name_predicts_own_options(trained, tmp_path):
    raw = raw_synthetic_chain(trained)
    two = raw[raw["quote_date"] >= raw["quote_date"].unique()[-2]]
    with pytest.raises(FileNotFoundError) as info:
        run_predict(trained.output_dir, tmp_path / "absent.csv")
    assert "input=" in str(info.value) and "data.path" not in str(info.value)
    path = tmp_path / "no_strike.csv"
    two.drop(columns="strike").to_csv(path, index=False)
    with pytest.raises(ValueError) as info:
        run_predict(trained.output_dir, path)
    assert "the input needs a column 'strike'" in str(info.value) and "data.columns.strike=<" not in str(info.value)
    path = tmp_path / "two.csv"
    two.to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"date='notadate' is not a date; give date=YYYY-MM-DD"):
        predict(OmegaConf.create({"run": str(trained.output_dir), "input": str(path), "output": None,
                                  "date": "notadate", "tracking_uri": None}))


def test_predict_parses_mixed_date_formats_as_training_does(trained, tmp_path):
    raw = raw_synthetic_chain(trained)
    two = raw[raw["quote_date"] >= raw["quote_date"].unique()[-2]].copy()
    iso = run_predict(trained.output_dir, _csv(two, tmp_path / "iso.csv"))
    stamped = two.astype({"quote_date": str, "expiry": str})
    d = pd.to_datetime(stamped["quote_date"])
    stamped.loc[stamped.index[::2], "quote_date"] = d[::2].dt.strftime("%d/%m/%Y")  # mixed with ISO, as training takes
    stamped.loc[stamped.index[1::3], "quote_date"] = d[1::3].dt.strftime("%Y-%m-%dT16:00:00+00:00")
    mixed = run_predict(trained.output_dir, _csv(stamped, tmp_path / "mixed.csv"))
    pd.testing.assert_frame_equal(mixed, iso)


def _csv(df: pd.DataFrame, path: Path) -> Path:
    df.to_csv(path, index=False)
    return path
