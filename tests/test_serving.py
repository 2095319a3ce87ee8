"""vforge.serving: the model.pt schema (ModelBundle), loading a run, and serving raw chain rows."""

from __future__ import annotations

import inspect
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import scoring_server
from omegaconf import OmegaConf, open_dict

from vforge.data import features as feats
from vforge.data import messy
from vforge.data.chain import normalize
from vforge.data.dataset import CONTRACT, build_rows, info_dates, next_date_rows
from vforge.serving import ChainModel, ModelBundle, load_run, load_serving, loader_options
from vforge.train import train

from .conftest import CONF_DIR, TINY_DATA
from .test_predict import raw_synthetic_chain


def test_model_pt_round_trips_and_old_files_still_load(make_cfg, tmp_path):
    cfg = make_cfg()
    train(cfg)
    path = Path(cfg.output_dir) / "model.pt"
    saved = torch.load(path, weights_only=False)
    assert isinstance(saved, dict)  # model.pt stays a plain dict of the bundle's fields
    bundle = ModelBundle.load(path)
    assert bundle.feature_names == list(cfg.data.features) and bundle.target == cfg.data.target
    # the last quote date's canonical rows travel with the model: one date, its quotes, with IVs
    surface = bundle.surface_frame()
    assert surface is not None and surface["quote_date"].nunique() == 1 and len(surface) > 10
    assert np.isfinite(surface["implied_volatility"]).all()

    bundle.save(tmp_path / "copy.pt")
    again = ModelBundle.load(tmp_path / "copy.pt")
    assert again.to_dict().keys() == bundle.to_dict().keys()
    pd.testing.assert_frame_equal(again.surface_frame(), surface)

    # a model.pt written before the surface (and the averaged-weights prefix) existed loads and predicts alike
    old = {k: v for k, v in saved.items() if k != "surface"}
    old["state_dict"] = {f"module.{k}": v for k, v in saved["state_dict"].items()}
    torch.save(old, tmp_path / "old.pt")
    x, base = torch.randn(7, len(bundle.feature_names)), torch.full((7,), 0.2)
    new_serving, _ = load_serving(path)
    old_serving, old_ckpt = load_serving(tmp_path / "old.pt")
    assert old_ckpt["surface"] is None
    with torch.inference_mode():
        torch.testing.assert_close(old_serving(x, base), new_serving(x, base), rtol=0, atol=0)


# --- re-marking through the serving API: folder, registry and the REST scoring code answer alike -----------------

REGISTERED = "vforge-test-serving"


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory, cache_dir, mlflow_uri):
    """A tiny run on a chain file whose last quote date is held out (data.end_date): that date is "today" for a
    service, the run's last date its previous date. Logged and registered in MLflow."""
    tmp = tmp_path_factory.mktemp("chain_run")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["trainer=fast", *TINY_DATA], return_hydra_config=True)
    raw = raw_synthetic_chain(cfg).drop(columns="model_iv")  # a market's table: not the simulator's own IVs
    dates = np.sort(raw["quote_date"].unique())
    path = tmp / "chain.csv"
    raw.to_csv(path, index=False)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "trainer=fast", "data=chain", f"data.path={path}", f"data.end_date={pd.Timestamp(dates[-2]).date()}",
            "evaluation.plots=false", "logger=mlflow", f"logger.tracking_uri={mlflow_uri}",
            "logger.experiment=test-serving", f"logger.registered_model={REGISTERED}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
        cfg.output_dir = str(tmp / "run")
    train(cfg)
    today, previous = raw[raw["quote_date"] == dates[-1]], raw[raw["quote_date"] == dates[-2]]
    (version,) = mlflow.MlflowClient(mlflow_uri).search_model_versions(f"name='{REGISTERED}'")
    return SimpleNamespace(cfg=cfg, today=today.reset_index(drop=True), previous=previous, uri=mlflow_uri,
                           model_uri=f"models:/{REGISTERED}/{version.version}")


def request(*parts: pd.DataFrame) -> pd.DataFrame:
    """Rows as a client sends them: dates as ISO strings."""
    rows = pd.concat(parts, ignore_index=True)
    return rows.assign(quote_date=rows["quote_date"].astype(str), expiry=rows["expiry"].astype(str))


def test_a_request_of_one_date_is_answered_from_the_surface_the_model_carries(chain_run):
    chain = load_run(chain_run.cfg.output_dir)
    today_only = chain.remark(request(chain_run.today))
    with_previous = chain.remark(request(chain_run.previous, chain_run.today))
    assert today_only.previous_from == "model" and with_previous.previous_from == "request"
    assert today_only.previous_date == with_previous.previous_date == pd.Timestamp(chain_run.previous["quote_date"].iloc[0])
    pd.testing.assert_frame_equal(today_only.ivs, with_previous.ivs)
    assert today_only.dropped == with_previous.dropped
    # every row of the date is re-marked or counted under a reason
    assert today_only.contracts == len(chain_run.today) == len(today_only.ivs) + sum(today_only.dropped.values())
    assert today_only.dropped.get("drop_zero_bid", 0) > 0  # the synthetic chain has zero bids in its wings


def scoring_response(model, body: dict) -> tuple[int, dict | str]:
    """What ``mlflow models serve`` answers (status, JSON or message), through its own request code in process."""
    try:
        response = scoring_server.invocations(json.dumps(body), "application/json", model,
                                              model.metadata.get_input_schema())
    except MlflowException as e:
        return e.get_http_status_code(), e.message
    return response.status, json.loads(response.response)


def split_body(rows: pd.DataFrame, **params: str) -> dict:
    """A split-oriented JSON request; floats as Python writes them (exact; pandas' to_json keeps 10 digits)."""
    split = {"columns": list(rows.columns), "data": rows.to_numpy(object).tolist()}
    return {"dataframe_split": split, **({"params": params} if params else {})}


def test_folder_registry_and_rest_give_the_same_answer(chain_run):
    folder = load_run(chain_run.cfg.output_dir).remark(request(chain_run.today)).to_json()
    model = mlflow.pyfunc.load_model(chain_run.model_uri)
    registry = model.predict(request(chain_run.today))
    status, rest = scoring_response(model, split_body(request(chain_run.today)))
    assert status == 200 and rest["predictions"] == folder == json.loads(json.dumps(registry))
    assert folder["previous_from"] == "model" and folder["dropped"] and folder["re_marked"] > 0
    # with its own previous date, the same IVs and drop counts for the same rows of the date
    status, own = scoring_response(model, split_body(request(chain_run.previous, chain_run.today)))
    assert status == 200 and own["predictions"]["previous_from"] == "request"
    assert own["predictions"]["ivs"] == folder["ivs"] and own["predictions"]["dropped"] == folder["dropped"]

    # an MLflow 3 logged model with a signature and an input example (what the UI lists under "Logged models")
    client = mlflow.MlflowClient(chain_run.uri)
    exp = client.get_experiment_by_name("test-serving")
    (logged,) = client.search_logged_models([exp.experiment_id])
    assert logged.name == "chain_model"
    info = mlflow.models.get_model_info(f"models:/{logged.model_id}")
    assert info.signature is not None and "strike" in info.signature.inputs.input_names()
    assert info.saved_input_example_info is not None


def test_a_bad_request_is_a_400_that_names_the_cause(chain_run):
    model = mlflow.pyfunc.load_model(chain_run.model_uri)
    status, message = scoring_response(model, split_body(request(chain_run.today).drop(columns="strike")))
    assert status == 400 and "strike" in message
    last = request(chain_run.previous)  # the model's own last date: no earlier date to re-mark it from
    status, message = scoring_response(model, split_body(last))
    assert status == 400 and "needs the previous date's chain" in message
    status, message = scoring_response(model, split_body(request(chain_run.today), date="notadate"))
    assert status == 400 and "date='notadate' is not a date" in message


@pytest.mark.slow
def test_mlflow_models_serve_answers_like_the_folder_and_400s_a_bad_request(chain_run, tmp_path):
    """A real ``mlflow models serve --env-manager local`` of the registered model, over HTTP."""
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=chain_run.uri)
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", chain_run.model_uri,
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"], env=env,
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"))
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                time.sleep(0.5)

        def post(body: dict) -> tuple[int, dict]:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        folder = load_run(chain_run.cfg.output_dir).remark(request(chain_run.today)).to_json()
        status, answer = post(split_body(request(chain_run.today)))
        assert status == 200 and answer["predictions"] == folder
        status, error = post(split_body(request(chain_run.previous)))
        assert status == 400 and "needs the previous date's chain" in error["message"]
        assert error["error_code"] == "INVALID_PARAMETER_VALUE"
    finally:
        server.terminate()
        server.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_previous_date_is_normalized_once_and_its_content_is_the_key(chain_run):
    chain = load_run(chain_run.cfg.output_dir)
    rows = request(chain_run.previous, chain_run.today)
    first = chain.remark(rows)
    assert len(chain._histories) == 1
    again = chain.remark(rows.copy())  # the same rows: the remembered canonical chain, the same answer to the bit
    assert len(chain._histories) == 1 and again.to_json() == first.to_json()
    fresh = load_run(chain_run.cfg.output_dir).remark(rows)
    assert fresh.to_json() == first.to_json()
    moved = rows.copy()  # another previous surface (its prices 5% up): normalized anew
    previous = moved["quote_date"] < moved["quote_date"].max()
    moved.loc[previous, ["bid", "ask"]] *= 1.05
    other = chain.remark(moved)
    assert len(chain._histories) == 2
    assert not np.allclose(other.ivs["baseline"], first.ivs["baseline"])


def test_logging_the_chain_model_prints_no_mlflow_chatter(chain_run, capfd):
    """A run's output ends with the results, not MLflow's CloudPickle warning, its input-example note and an
    artifact download bar (logging the pyfunc model would print all three)."""
    from vforge.tracking.registry import log_chain_model

    mlflow.set_tracking_uri(chain_run.uri)
    capfd.readouterr()
    with mlflow.start_run(experiment_id=mlflow.set_experiment("test-serving-quiet").experiment_id):
        uri = log_chain_model(Path(chain_run.cfg.output_dir) / "model.pt")
    out = "".join(capfd.readouterr())
    assert uri.startswith("models:/")
    for chatter in ("CloudPickle", "Validating input example", "Downloading artifacts"):
        assert chatter not in out
    assert logging.getLogger("mlflow.pyfunc").level == logging.NOTSET  # put back as it was


def test_logging_the_chain_model_does_not_replay_its_example_but_the_example_is_answered(chain_run, monkeypatch):
    """log_model would load the logged model back and predict its input example (MLflow's serving-input check,
    a warning if it failed); vforge skips that replay, and this test does it: the example and its serving payload
    are in the logged model, and the loaded model answers it."""
    import mlflow.models.utils as model_utils

    from vforge.tracking.registry import ChainIVModel, log_chain_model

    predicted = []
    real_predict = ChainIVModel.predict

    def predict(self, context, model_input, params=None):  # the signature MLflow inspects for params
        predicted.append(1)
        return real_predict(self, context, model_input, params)

    monkeypatch.setattr(ChainIVModel, "predict", predict)
    hook = model_utils._validate_serving_input
    mlflow.set_tracking_uri(chain_run.uri)
    with mlflow.start_run(experiment_id=mlflow.set_experiment("test-serving-replay").experiment_id):
        uri = log_chain_model(Path(chain_run.cfg.output_dir) / "model.pt")
    assert predicted == [] and model_utils._validate_serving_input is hook  # not replayed; the hook put back
    local = Path(mlflow.artifacts.download_artifacts(uri))
    assert (local / "serving_input_example.json").exists() and (local / "input_example.json").exists()
    answer = model_utils._validate_serving_input(str(local), (local / "serving_input_example.json").read_text())
    assert predicted == [1] and answer["re_marked"] == len(answer["ivs"]) > 0


# --- the serving fast path: one date's rows against the previous date(s), as the training pipeline builds them ---

MESSY_TINY = ["data=synthetic_messy", "data.n_days=60", "data.listing.n_monthlies=3", "data.listing.n_weeklies=1"]


def market(make_cfg, *overrides: str) -> tuple[pd.DataFrame, dict]:
    """A market's raw rows as a client would send them (its chain columns only) and the run's data options."""
    cfg = make_cfg(*overrides, tiny=not overrides)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    if overrides:
        raw = messy.generate_messy_chain(**{k: data[k] for k in inspect.signature(messy.generate_messy_chain).parameters})
    else:
        raw = raw_synthetic_chain(cfg)
    return raw.drop(columns=["model_iv", "regime"], errors="ignore"), data


def untrained_chain_model(data: dict) -> ChainModel:
    """A ChainModel of an untrained MLP on the default features (what is tested is the pipeline, not the model)."""
    features = list(data["features"])
    config = {"model": {"_target_": "vforge.models.mlp.MLP", "n_blocks": 1, "d_block": 16, "dropout": 0.0},
              "data": data}
    torch.manual_seed(0)
    model = instantiate(config["model"], n_num=len(features), cat_cardinalities=[], d_out=1)
    bundle = ModelBundle(state_dict=model.state_dict(), config=config, feature_names=features,
                         x_mean=np.zeros(len(features)), x_std=np.ones(len(features)), y_center=0.0, y_scale=0.01,
                         target="change")
    return ChainModel(bundle)


@pytest.mark.parametrize("overrides", [(), tuple(MESSY_TINY)], ids=["synthetic", "synthetic_messy"])
def test_next_date_rows_are_build_rows_bit_for_bit(make_cfg, overrides):
    """Every feature of ``REGISTRY`` (not only the selected ones), the base and the drops of a date, built from the
    previous dates alone, equal those the training pipeline builds for it on the whole chain."""
    raw, data = market(make_cfg, *overrides)
    options = loader_options(data)
    chain = normalize(raw, options, report={})
    built = build_rows(chain, horizon=0, fallback=data["fallback"]).rows
    dates = np.sort(chain["quote_date"].unique())
    gaps = np.diff(dates).astype("timedelta64[D]").astype(int)
    # the second date (one previous date), the date after the longest gap, the last date
    for date in sorted({dates[1], dates[1 + int(np.argmax(gaps))], dates[-1]}):
        expected = built[built["quote_date"] == date].reset_index(drop=True)
        today = chain[chain["quote_date"] == date]
        rows, no_base = next_date_rows(info_dates(chain[chain["quote_date"] < date]), today,
                                       fallback=data["fallback"])
        columns = ["quote_date", *CONTRACT, "persistence", "prev_loo_iv", *feats.REGISTRY, "base"]
        pd.testing.assert_frame_equal(rows[columns], expected[columns], check_exact=True)
        assert no_base == len(today) - len(expected)
        assert expected["prev_iv_missing"].sum() > 0  # contracts new on the date take the previous surface
    with pytest.raises(ValueError, match="one quote date after"):
        next_date_rows(info_dates(chain[chain["quote_date"] < dates[-1]]), chain[chain["quote_date"] >= dates[-2]])


def test_the_json_answer_holds_the_frames_records_with_iso_dates(make_cfg):
    """``Remark.to_json``'s rows are ``ivs.to_dict(orient="records")`` with the dates as YYYY-MM-DD: the same Python
    values, so the same JSON text."""
    raw, data = market(make_cfg)
    dates = np.sort(raw["quote_date"].unique())
    answer = untrained_chain_model(data).remark(request(raw[raw["quote_date"] == dates[-2]],
                                                        raw[raw["quote_date"] == dates[-1]]))
    ivs = answer.ivs
    expected = ivs.assign(**{c: ivs[c].dt.strftime("%Y-%m-%d") for c in ("quote_date", "expiry")}).to_dict(
        orient="records")
    got = answer.to_json()["ivs"]
    assert len(got) == len(ivs) > 0 and got == expected and json.dumps(got) == json.dumps(expected)
    assert {type(v) for row in got for v in row.values()} == {str, float, bool}


@pytest.mark.parametrize("overrides", [(), tuple(MESSY_TINY)], ids=["synthetic", "synthetic_messy"])
def test_remark_gives_the_training_pipelines_ivs_and_drop_counts(make_cfg, overrides):
    """A request's IVs are the model's on the rows and features the training pipeline builds for that date from the
    whole file, and its drops by reason are what the loader drops of that date's rows in the whole file."""
    raw, data = market(make_cfg, *overrides)
    chain_model = untrained_chain_model(data)
    dates = np.sort(raw["quote_date"].unique())
    date, previous = dates[-1], dates[-2]
    report: dict = {}
    chain = normalize(raw, chain_model.options, report=report)
    without: dict = {}
    normalize(raw[raw["quote_date"] != date], chain_model.options, report=without)
    loader_drops = {k: v - without["dropped"].get(k, 0) for k, v in report["dropped"].items()}
    built = build_rows(chain, horizon=0, fallback=data["fallback"]).rows
    expected = built[built["quote_date"] == date].reset_index(drop=True)
    with torch.inference_mode():
        iv = chain_model.module(torch.tensor(expected[chain_model.bundle.feature_names].to_numpy(np.float32)),
                                torch.tensor(expected["base"].to_numpy(np.float32))).numpy()

    answer = chain_model.remark(request(raw[raw["quote_date"] == previous], raw[raw["quote_date"] == date]))
    assert answer.previous_date == previous and answer.contracts == (raw["quote_date"] == date).sum()
    pd.testing.assert_frame_equal(answer.ivs[CONTRACT], expected[CONTRACT])
    np.testing.assert_array_equal(answer.ivs["implied_volatility"].to_numpy(), iv.astype(np.float64))
    np.testing.assert_array_equal(answer.ivs["baseline"].to_numpy(), expected["base"].to_numpy())
    no_base = (chain["quote_date"] == date).sum() - len(expected)
    assert answer.dropped == {k: v for k, v in {**loader_drops, "drop_no_previous_surface": no_base}.items() if v}
    assert sum(answer.dropped.values()) > 0 and answer.contracts == len(answer.ivs) + sum(answer.dropped.values())
