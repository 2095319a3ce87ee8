"""Re-marking a chain through the serving API: in process (``vforge.serving.ChainModel.remark``) and through ``mlflow models serve``.

    python scripts/bench_serving.py [--run <run folder>] [--contracts 1000] [--repeat 30] [--no-rest]

The request is raw rows as a service would send them: the contracts of one quote date of the default synthetic
market (up to ``--contracts``, the date with the most listed contracts) and the same contracts' rows on the
previous date; the answer is their IVs. Without ``--run`` a one-epoch MLP is trained first (``trainer=fast``).
Figures are medians after a warm-up call; the REST figure is the HTTP round trip of the JSON request to a local
``mlflow models serve --env-manager local`` of the run's pyfunc model.
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

import pandas as pd
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from vforge import CONF_DIR
from vforge.data.synthetic import cached_chain
from vforge.serving import load_run, median_ms


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
    keys = ("seed", "n_days", "spot0", "rate", "dividend_yield", "heston", "jumps", "listing", "quotes")
    raw = cached_chain(data_cfg["cache_dir"], **{k: data_cfg[k] for k in keys})
    dates = sorted(raw["quote_date"].unique())
    counts = raw.groupby("quote_date").size()
    date = counts.loc[dates[1]:].idxmax()
    previous = dates[dates.index(date) - 1]
    today = raw[raw["quote_date"] == date].head(n_contracts)
    contract = ["expiry", "strike", "option_type"]
    before = raw[raw["quote_date"] == previous].merge(today[contract], on=contract)
    return pd.concat([before, today], ignore_index=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rest_ms(checkpoint: Path, request: pd.DataFrame, repeat: int, workdir: Path) -> float:
    import mlflow

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
        body = json.dumps({"dataframe_split": json.loads(request.to_json(orient="split", index=False,
                                                                          date_format="iso"))}).encode()

        def call():
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as response:
                return response.read()

        return median_ms(call, repeat)
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
        out = chain.remark(request).ivs
        print(f"request: {len(request)} raw rows ({request['quote_date'].nunique()} quote dates) -> {len(out)} IVs")
        print(f"in process, ChainModel.remark: {median_ms(lambda: chain.remark(request), args.repeat):.1f} "
              f"ms median of {args.repeat}")
        if not args.no_rest:
            print(f"REST, mlflow models serve round trip: {rest_ms(checkpoint, request, args.repeat, workdir):.1f} ms "
                  f"median of {args.repeat}")


if __name__ == "__main__":
    main()
