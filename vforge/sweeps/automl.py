"""AutoML across models (``hydra/sweeper=automl``, see conf/experiment/automl.yaml).

Each model gets its own Optuna study on its conf/hparams_search/<model>.yaml space, with a budget of
trials and/or minutes; then the best run of each model is re-evaluated from its checkpoint on the same
split beside persistence, the baseline, SSVI, ``model=linear`` and LightGBM; an ensemble of the best models, the
linear model, LightGBM and the baseline is fit on validation; AutoML picks what to serve, simplest first
(``vforge.evaluation.selection``: ``model=linear``, itself persistence unless the ridge beat it out of sample, unless
a searched model or the ensemble beats it clearly on the validation dates), and the leaderboard, the pick first, goes to leaderboard.md/.csv in the sweep
folder and to the MLflow parent run.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from vforge.evaluation import leaderboard as L
from vforge.sweeps import study as S
from vforge.sweeps.pruning import ATTR_PRUNED_REASON, BUDGET_SPENT
from vforge.sweeps.search_space import parse_params
from vforge.sweeps.sweeper import BEAT_MARGIN, StudySweeper, finished_value

log = logging.getLogger(__name__)


def conf_file(group: str, name: str, config: DictConfig | None) -> Path:
    """conf/<group>/<name>.yaml from the app's config search path (vforge's conf/ as a fallback)."""
    roots: list[Path] = []
    if config is not None:
        for src in config.hydra.runtime.get("config_sources", []):
            if src.get("schema") == "file":
                roots.append(Path(src.path))
    roots.append(Path(__file__).resolve().parents[2] / "conf")
    for root in roots:
        path = root / group / f"{name}.yaml"
        if path.exists():
            return path
    raise FileNotFoundError(f"no {group} config {name!r}: expected conf/{group}/{name}.yaml "
                            f"(looked in {', '.join(map(str, roots))})")


def model_search_params(model: str, config: DictConfig | None = None) -> dict[str, str]:
    """``hydra.sweeper.params`` of conf/hparams_search/<model>.yaml."""
    cfg = OmegaConf.load(conf_file("hparams_search", model, config))
    params = OmegaConf.select(cfg, "hydra.sweeper.params")
    if not params:
        raise ValueError(f"conf/hparams_search/{model}.yaml has no hydra.sweeper.params")
    return {str(k): str(v) for k, v in params.items()}


def _metric_name(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_\-. /]", "_", name)


def budget_cut(trial: optuna.trial.FrozenTrial) -> bool:
    """A trial the time budget stopped after an epoch: pruned for Optuna, but its run finished and was saved."""
    return trial.state == TrialState.PRUNED and trial.user_attrs.get(ATTR_PRUNED_REASON) == BUDGET_SPENT


class AutoMLSweeperImpl(StudySweeper):
    def __init__(self, *, sampler: Any, pruner: Any, models: list[str], n_trials: int, minutes: float | None,
                 n_jobs: int, storage: str | None, study_name: str, max_failure_rate: float, ensemble_size: int,
                 lightgbm: bool, latency_rows: int, heartbeat_interval: int | None, grace_period: int | None,
                 mlflow: bool, registered_model: str | None = None) -> None:
        super().__init__(sampler=sampler, pruner=pruner, n_jobs=n_jobs, max_failure_rate=max_failure_rate,
                         heartbeat_interval=heartbeat_interval, grace_period=grace_period, mlflow=mlflow)
        if not models:
            raise ValueError("hydra.sweeper.models is empty; e.g. hydra.sweeper.models=[mlp,resnet]")
        if n_trials < 1 and not minutes:
            raise ValueError(f"give each model a budget: hydra.sweeper.n_trials >= 1 or hydra.sweeper.minutes, "
                             f"got {n_trials=}, {minutes=}")
        self.models = list(models)
        self.n_trials = n_trials if n_trials >= 1 else 10**9
        self.minutes = minutes
        self.storage = storage
        self.study_name = study_name
        self.ensemble_size = ensemble_size
        self.lightgbm = lightgbm
        self.latency_rows = latency_rows
        if registered_model and not mlflow:
            raise ValueError(f"hydra.sweeper.registered_model={registered_model!r} needs hydra.sweeper.mlflow=true: "
                             "the pick is registered from the sweep's MLflow parent run")
        self.registered_model = registered_model

    def sweep(self, arguments: list[str]) -> list[dict[str, Any]]:
        space_cli, fixed_cli, other = parse_params({}, arguments)
        if space_cli:
            raise ValueError(f"AutoML searches each model's own space; sweeps on the command line ({list(space_cli)}) "
                             "are not supported. Edit conf/hparams_search/<model>.yaml instead")
        if any(o.split("=")[0].lstrip("+~") == "model" for o in other):
            raise ValueError("choose the models with hydra.sweeper.models=[mlp,resnet], not model=...")
        fixed = [f"{k}={v}" for k, v in fixed_cli.items()] + other
        spaces = {m: parse_params(model_search_params(m, self.config))[0] for m in self.models}
        budget = f"{self.n_trials} trials per model" if self.n_trials < 10**9 else ""
        if self.minutes:
            budget += (" or " if budget else "") + f"{self.minutes:g} min in all"
        log.info("AutoML over %s: %s", ", ".join(self.models), budget)
        # minutes is the whole search's budget: each model gets an equal share of what is left when its turn comes
        # (a model that stops early leaves its time to the next); the running trial stops when its share is spent
        deadline = time.monotonic() + self.minutes * 60 if self.minutes else None
        status = "FAILED"
        studies: dict[str, optuna.Study] = {}
        try:
            for i, model in enumerate(self.models):
                share = max(deadline - time.monotonic(), 0) / (len(self.models) - i) if deadline else None
                study = self._open_study(self.storage, f"{self.study_name}-{model}", ["minimize"], spaces[model])
                studies[model] = study
                if self.parent is None and self.use_mlflow:
                    self._start_parent(study, f"automl-{self.study_name}", {
                        "models": ",".join(self.models), "n_trials_per_model": self.n_trials,
                        "minutes_per_model": self.minutes, "storage": self.storage_url})
                try:
                    self.run_study(study, space=spaces[model], fixed=[f"model={model}", *fixed],
                                   n_trials=self.n_trials, timeout=share, label=f"[{model}] ")
                except RuntimeError as e:  # too many failures for this model: the others still run
                    log.error("%s", e)
            rows = self.leaderboard(studies)
            status = "FINISHED"
            return rows
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            if self.parent is not None:
                self.parent.end(status)

    def compare_with_persistence(self, pick: L.Entry, persistence: L.Entry, why: str) -> None:
        """Say what AutoML picked and whether it beats persistence on validation (the rows a desk's own number
        covers)."""
        # persistence exists on the previously quoted rows only: compare like for like there
        bench, mine = persistence.val["prev_quoted_rmse"], pick.val["prev_quoted_rmse"]
        gain = 1 - mine / bench if bench > 0 else float("nan")
        text = (f"AutoML's pick: {pick.name} ({why}); val RMSE {mine:.4f} vs {bench:.4f} for persistence on the rows "
                f"quoted the previous date ({gain:+.1%})")
        if gain >= BEAT_MARGIN:
            log.info("%s", text)
        else:
            log.warning("%s: it does not beat persistence (by %.0f%% or more)", text, BEAT_MARGIN * 100)

    def pick(self, baseline: L.Entry, linear: L.Entry | None, models: list[L.Entry], ensemble: L.Entry | None,
             data: Any, settings: dict[str, Any], cap: float) -> tuple[L.Entry, str, L.Entry]:
        """The entry AutoML picks (``selection.pick``, with the do-no-harm step's tolerance, p-value bar and cap):
        ``model=linear`` (after its do-no-harm step: persistence unless the ridge beat it on inner walk-forward
        folds; the baseline if it failed), replaced by a searched model (fewest parameters first) or the ensemble only
        on validation evidence; why; and the entry to serve: the pick, or where the pick is an ensemble that could not
        be saved as a run, the pick of the same rule among the others. Each candidate's notes say why it was or was
        not picked."""
        from vforge.evaluation import selection

        candidates = selection.candidates(linear or baseline, models, lambda e: (e.n_params, e.val["rmse"]), ensemble)
        va = data.val

        def choose(entries: list[L.Entry]) -> selection.Pick:
            evidence = [e.val_pred if e.evidence is None else e.evidence for e in entries]
            return selection.pick([e.name for e in entries], evidence, va.iv, va.base,
                                  va.aux["quote_date_idx"].numpy(), np.isfinite(va.persistence),
                                  tolerance=float(settings.get("tolerance", 0.005)),
                                  max_p=float(settings.get("max_p", 0.05)), cap=cap)

        chosen = choose(candidates)
        for i, e in enumerate(candidates):
            text = ("AutoML's pick: " if i == chosen.index else "not picked: ") + chosen.why[e.name]
            e.info["notes"] = f"{text}; {e.info['notes']}" if e.info.get("notes") else text
        picked = candidates[chosen.index]
        unsaved = picked is ensemble and not ensemble.info.get("output_dir")
        serve = candidates[choose(candidates[:-1]).index] if unsaved else picked
        return picked, chosen.why[chosen.name], serve

    @staticmethod
    def serving_line(picked: L.Entry, serve: L.Entry) -> str:
        """How to serve what AutoML picked (``python -m vforge.predict``), or what to serve where it cannot be."""
        run = serve.info.get("output_dir")
        how = (f"python -m vforge.predict run={run} input=<chain>" if run else
               "persistence: no model to serve (the previous date's IVs)")
        if serve is picked:
            return f"serve the pick: {how}"
        return (f"the pick, {picked.name}, was not saved as a servable model (the error above); the same rule "
                f"among the other candidates picks {serve.name}: {how}")

    def leaderboard(self, studies: dict[str, optuna.Study]) -> list[dict[str, Any]]:
        entries: list[L.Entry] = []
        data = None
        for model, study in studies.items():
            trials = study.get_trials(deepcopy=False)
            # a trial the time budget cut short is pruned for Optuna but finished and saved: it competes too
            done = {t.number: (float(t.values[0]), "") for t in trials if t.state == TrialState.COMPLETE and
                    "output_dir" in t.user_attrs}
            done |= {t.number: (v, "; stopped by the time budget") for t in trials if budget_cut(t)
                     for v in [finished_value(t)] if v is not None}
            counts = {s: sum(t.state == s and S.counted(t) for t in trials)
                      for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
            minutes = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials
                          if t.datetime_complete and t.datetime_start) / 60
            info = {"trials": "{}/{}/{}".format(*counts.values()), "search_min": minutes}
            if not done:
                log.warning("[%s] no complete trial: not on the leaderboard", model)
                continue
            number = min(done, key=lambda n: done[n][0])
            best, (value, note) = next(t for t in trials if t.number == number), done[number]
            try:
                entry, data = L.model_entry(model, best.user_attrs["output_dir"], data, self.latency_rows,
                                            info | {"trial": best.number, "params": best.params,
                                                    "notes": f"trial {best.number}{note}"})
            except Exception as e:  # noqa: BLE001 - a missing checkpoint should not sink the whole board
                log.error("[%s] could not re-evaluate trial %d: %s", model, best.number, e)
                continue
            if not math.isclose(entry.val["rmse"], value, rel_tol=1e-3, abs_tol=1e-4):
                log.warning("[%s] re-evaluated val RMSE %.4f differs from the trial's %.4f", model, entry.val["rmse"],
                            value)
            entries.append(entry)
        if data is None:
            raise RuntimeError("AutoML: no model finished a trial; nothing to rank (see the errors above)")
        models = sorted(entries, key=lambda e: e.val["rmse"])
        config = models[0].info["config"]
        settings = dict(config.get("do_no_harm") or {})
        persistence, baseline = L.persistence_entry(data), L.baseline_entry(data)
        refs = [persistence, baseline]
        linear = next((e for e in models if e.name == "linear"), None)  # searched: that one is the linear row
        if linear is None:
            try:
                model_cfg = OmegaConf.to_container(OmegaConf.load(conf_file("model", "linear", self.config)))
                linear = L.linear_entry(data, config, cast(dict[str, Any], model_cfg), self.latency_rows,
                                        save_to=self.sweep_dir / "linear")
                refs.append(linear)
            except Exception as e:  # noqa: BLE001 - the reference should not sink the board
                log.error("model=linear reference row failed: %s", e)
        ssvi = L.ssvi_entry(data)
        if ssvi is not None:
            refs.append(ssvi)
        lgb = L.lightgbm_entry(data, latency_rows=self.latency_rows) if self.lightgbm else None
        if lgb is not None:
            refs.append(lgb)
        # the ensemble: the best searched models, the linear model, LightGBM (a reference row and no candidate alone,
        # but its errors are the least like the networks') and the baseline (its weight shrinks the others' change
        # toward persistence), weights fit on validation with each date's weight capped
        members = models[: self.ensemble_size]
        members += [e for e in (linear, lgb, baseline) if e is not None and e not in members]
        cap = float(settings.get("cap") or 0.9)
        ens, weights = L.ensemble_entry(members, data, cap) if len(members) >= 2 else (None, {})
        if ens is not None:
            entries.append(ens)
            try:
                ens.info["output_dir"] = str(L.save_ensemble(members, weights, data, config, self.sweep_dir / "ensemble"))
            except Exception as e:  # noqa: BLE001 - a servable ensemble is a convenience; the board stands without it
                log.error("the ensemble was not saved as a servable model: %s", e)
        chosen, why, serve = self.pick(baseline, linear, models, ens, data, settings, cap)
        rows = L.rank(entries + refs, first=chosen)
        md, csv = L.write(rows, self.sweep_dir, title=f"AutoML leaderboard ({self.study_name})")
        (self.sweep_dir / "ensemble.json").write_text(json.dumps(
            {"weights_fit_on": "val", "dates_capped_at": cap, "weights": weights,
             "members": {e.name: e.info.get("output_dir") for e in members}, "pick": chosen.name, "pick_why": why,
             "serve": {"name": serve.name, "run": serve.info.get("output_dir")}}, indent=1))
        log.info("leaderboard (%s)\n%s", md, md.read_text())
        self.compare_with_persistence(chosen, persistence, why)
        log.info("%s", self.serving_line(chosen, serve))
        if self.parent is not None:
            for path in (md, csv, self.sweep_dir / "ensemble.json"):
                self.parent.log_artifact(path)
            for r in rows:
                name = _metric_name("ensemble" if r["kind"] == "ensemble" else r["name"])
                self.parent.log_metrics({f"leaderboard/{name}/{k}": r[k] for k in
                                         ("val_rmse", "test_rmse", "test_prev_quoted_rmse", "test_dm_pvalue",
                                          "test_dates_beaten", "test_arb_calendar", "test_arb_butterfly", "test_mae",
                                          "test_r2", "latency_ms_1k") if r[k] == r[k]})
            if rows:
                self.parent.set_tags({"automl.winner": rows[0]["name"], "automl.serve": serve.name,
                                      **({"automl.serve_run": serve.info["output_dir"]}
                                         if serve.info.get("output_dir") else {})})
            run = serve.info.get("output_dir")
            if self.registered_model and run:
                uri = self.parent.log_chain_model(Path(run) / "model.pt", self.registered_model)
                log.info("AutoML's served pick %s registered as %r (%s)", serve.name, self.registered_model, uri)
            elif self.registered_model:
                log.warning("nothing registered under %r: the pick is persistence (no model)", self.registered_model)
        return rows
