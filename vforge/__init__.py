"""vforge (VolatilityForge): neural networks for option implied volatility."""

__version__ = "0.1.0"
