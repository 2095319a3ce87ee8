"""vforge (VolatilityForge): neural networks for option implied volatility."""

import os
from pathlib import Path

__version__ = "0.1.0"

# The entry points' config folder as an absolute path: Hydra resolves a relative ``config_path`` against the
# calling module's package when a console script (vforge-train, ...) runs it, and ``conf/`` is no package.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

# MLflow 3 fetches a telemetry config from the network and sends usage events from background threads; vforge
# downloads nothing at run time, so that is off unless the user asks for it (MLFLOW_DISABLE_TELEMETRY=false).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
