"""Sweeps and AutoML: the job side of vforge's Optuna sweeper (pruning, trial reconnection), the sweep's
MLflow parent run, and AutoML (its leaderboard and ensembles live in vforge/evaluation/)."""
