"""Re-marking a chain through the serving API: in process (``vforge.serving.ChainModel.remark``) and through
``mlflow models serve``, against the goals of issue 14 (20 ms in process, 100 ms over REST, idle machine).

    python scripts/bench_serving.py [--run <run folder>] [--contracts 1000] [--repeat 30] [--no-rest]

The request is raw rows as a service would send them: the contracts of one quote date of the default synthetic
market (up to ``--contracts``, the date with the most listed contracts) and the same contracts' rows on the
previous date; the answer is their IVs. Without ``--run`` a one-epoch MLP is trained first (``trainer=fast``).
Figures are medians after a warm-up call (``vforge.serving.median_ms``):

- in process, warm: the same request again (its previous date is remembered normalized: a service re-marking
  against one previous surface); cold: the previous date new on every call; and where a cold call goes (stages);
- REST: MLflow's own request handling in process (``scoring_server.invocations``: JSON parse, signature, predict,
  JSON answer) and the HTTP round trip to a local ``mlflow models serve --env-manager local`` (split-oriented JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from vforge import CONF_DIR
from vforge.data.chain import REQUIRED
from vforge.data.dataset import info_dates, next_date_columns
from vforge.data.synthetic import generated
from vforge.serving import ChainModel, load_run, median_ms
from vforge.tracking.registry import OPTIONAL

GOAL_MS = {"in process": 20.0, "REST": 100.0}  # issue 14, 1,000 contracts, idle machine


def train_quick(out_dir: Path) -> tuple[Path, dict]:
    from vforge.train import train

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["trainer=fast", "logger=none", "evaluation.plots=false"],
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # ${hydra:...} in run_name resolves as in a real run
    with open_dict(cfg):
        del cfg.hydra
        cfg.output_dir = str(out_dir)
    train(cfg)
    return out_dir / "model.pt", OmegaConf.to_container(cfg.data, resolve=True)


def request_rows(data_cfg: dict, n_contracts: int) -> pd.DataFrame:
    """The request: the generated market's chain columns, those of the pyfunc signature (not the simulator's own
    ``model_iv``, which no market publishes: MLflow would drop it with a warning on every call)."""
    raw = generated(**data_cfg)
    raw = raw[[c for c in raw.columns if c in {*REQUIRED, *OPTIONAL}]]
    dates = sorted(raw["quote_date"].unique())
    counts = raw.groupby("quote_date").size()
    date = counts.loc[dates[1]:].idxmax()
    previous = dates[dates.index(date) - 1]
    today = raw[raw["quote_date"] == date].head(n_contracts)
    contract = ["expiry", "strike", "option_type"]
    before = raw[raw["quote_date"] == previous].merge(today[contract], on=contract)
    return pd.concat([before, today], ignore_index=True)


def show(what: str, ms: float, goal: str, repeat: int) -> None:
    print(f"{what:<46} {ms:8.1f} ms median of {repeat}  ({ms / GOAL_MS[goal]:.1f}x the {GOAL_MS[goal]:.0f} ms goal)")


def stages(chain: ChainModel, request: pd.DataFrame, repeat: int) -> None:
    """Where a call goes: the previous date (cold only: its loader checks and ``info_dates``), the date's rows through
    the loader, their features (``next_date_columns``), the model."""
    today, previous, info = chain.chain(request, None)
    history = chain.normalized_history(request[request["quote_date"] < info["date"]])[0]
    fallback = chain.data_cfg.get("fallback", "moneyness")
    _, columns = next_date_columns(previous, today, fallback=fallback)
    ok = np.isfinite(columns["base"])
    x = torch.tensor(np.column_stack([columns[f] for f in chain.bundle.feature_names])[ok].astype(np.float32))
    base = torch.tensor(columns["base"][ok].astype(np.float32))
    with torch.inference_mode():
        model = median_ms(lambda: chain.module(x, base), repeat)

    def cold_previous() -> None:
        chain._histories.clear()
        chain.normalized_history(request[request["quote_date"] < info["date"]])

    for name, ms in (("previous date (loader, info_dates; cold only)", median_ms(cold_previous, repeat)),
                     ("  of which info_dates", median_ms(lambda: info_dates(history), repeat)),
                     ("the request through the loader (warm)", median_ms(lambda: chain.chain(request, None),
                                                                             repeat)),
                     ("features (next_date_columns)", median_ms(lambda: next_date_columns(previous, today,
                                                                                          fallback=fallback), repeat)),
                     (f"model ({len(x)} rows, {torch.get_num_threads()} threads)", model)):
        print(f"  {name:<44} {ms:8.1f} ms")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rest_ms(checkpoint: Path, request: pd.DataFrame, repeat: int, workdir: Path) -> tuple[float, float]:
    import mlflow
    from mlflow.pyfunc import scoring_server

    from vforge.tracking.registry import log_chain_model

    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    mlflow.set_experiment("bench_serving")
    with mlflow.start_run():
        uri = log_chain_model(checkpoint)
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'mlflow.db'}")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
                               "-p", str(port), "-h", "127.0.0.1", "-w", "1"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        start = time.perf_counter()
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1)
                break
            except OSError:
                if server.poll() is not None or time.perf_counter() - start > 180:
                    raise RuntimeError("mlflow models serve did not come up") from None
                time.sleep(0.5)
        print(f"mlflow models serve up in {time.perf_counter() - start:.1f} s")
        # split-oriented JSON as a client writes it: dates as YYYY-MM-DD, floats exact (Python's json)
        rows = request.assign(**{c: request[c].dt.strftime("%Y-%m-%d") for c in ("quote_date", "expiry")})
        body = json.dumps({"dataframe_split": {"columns": list(rows.columns),
                                               "data": rows.to_numpy(object).tolist()}}).encode()
        model = mlflow.pyfunc.load_model(uri)
        schema = model.metadata.get_input_schema()
        in_process = median_ms(lambda: scoring_server.invocations(body, "application/json", model, schema), repeat)

        def call():
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as response:
                return response.read()

        return in_process, median_ms(call, repeat)
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=None, help="a run folder (holding model.pt) of the default data")
    parser.add_argument("--contracts", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--no-rest", action="store_true", help="skip the mlflow models serve round trip")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.run is None:
            checkpoint, _ = train_quick(workdir / "run")
        else:
            checkpoint = args.run / "model.pt"
        chain = load_run(checkpoint)
        request = request_rows(chain.data_cfg, args.contracts)
        out = chain.remark(request)
        print(f"request: {len(request)} raw rows ({request['quote_date'].nunique()} quote dates), {out.contracts} "
              f"contracts of {out.date.date()} -> {len(out.ivs)} IVs (dropped: {out.dropped or 'none'}); "
              f"{torch.get_num_threads()} torch threads")

        def cold() -> None:
            chain._histories.clear()
            chain.remark(request)

        load_before = os.getloadavg()
        show("in process, ChainModel.remark, warm", median_ms(lambda: chain.remark(request), args.repeat),
             "in process", args.repeat)
        show("in process, ChainModel.remark, cold", median_ms(cold, args.repeat), "in process", args.repeat)
        stages(chain, request, args.repeat)
        if not args.no_rest:
            handling, round_trip = rest_ms(checkpoint, request, args.repeat, workdir)
            show("REST, MLflow's request handling in process", handling, "REST", args.repeat)
            show("REST, mlflow models serve HTTP round trip", round_trip, "REST", args.repeat)
        print("load average (1, 5, 15 min) at the start of the timings {:.2f} {:.2f} {:.2f}, at the end "
              "{:.2f} {:.2f} {:.2f} (2 cores: above ~0.5 the machine was not idle)".format(*load_before, *os.getloadavg()))


if __name__ == "__main__":
    main()
