"""vforge's Optuna sweeper for Hydra: the official plugin's keys on a modern Optuna, plus pruning (see config.py)."""
