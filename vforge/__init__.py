"""vforge (VolatilityForge): neural networks for option implied volatility."""

from pathlib import Path

__version__ = "0.1.0"

# The entry points' config folder as an absolute path: Hydra resolves a relative ``config_path`` against the
# calling module's package when a console script (vforge-train, ...) runs it, and ``conf/`` is no package.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
