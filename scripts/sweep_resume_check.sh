#!/bin/bash
# Issue 6, check 2: run a sweep, SIGKILL it once N trials are done, run the same command again, print the study.
# Usage (from a scratch folder; outputs/ and mlflow.db land there):
#   bash scripts/sweep_resume_check.sh 3 hparams_search=ft_transformer hydra.sweeper.n_trials=8 trainer.max_epochs=4
set -u
KILL_AFTER=$1; shift
export OMP_WAIT_POLICY=PASSIVE
STUDY_DB=outputs/optuna/$(python - "$@" <<'PY'
import sys
name = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("hparams_search=")), "sweep")
print(next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("hydra.sweeper.study_name=")), name))
PY
)
STUDY=$(basename "$STUDY_DB")
# storage null is a fresh study per sweep: resuming needs the study's URL (and its study_name)
CMD=(python -m vforge.train -m "$@" "hydra.sweeper.storage=sqlite:///$STUDY_DB.db" "hydra.sweeper.study_name=$STUDY")
finished() {
  python - "$STUDY" <<'PY' 2>/dev/null
import sys, optuna
optuna.logging.set_verbosity(optuna.logging.ERROR)
s = optuna.load_study(study_name=sys.argv[1], storage=f"sqlite:///outputs/optuna/{sys.argv[1]}.db")
print(sum(t.state.is_finished() for t in s.trials))
PY
}
"${CMD[@]}" > first.log 2>&1 &
PID=$!
until [ -f "$STUDY_DB.db" ] && [ "$(finished)" -ge "$KILL_AFTER" ]; do
  kill -0 "$PID" 2>/dev/null || { echo "the sweep ended before $KILL_AFTER trials were done"; exit 1; }
  sleep 1
done
kill -9 "$PID"
echo "SIGKILLed the sweep (pid $PID) after $(finished) finished trials"
"${CMD[@]}" > second.log 2>&1 || { echo "second run failed: see second.log"; exit 1; }
grep -E "\[HYDRA\] (trials \[|study ')" second.log | sed 's/^\[[^]]*\]\[HYDRA\] //'
python - "$STUDY" <<'PY'
import sys, optuna
optuna.logging.set_verbosity(optuna.logging.ERROR)
s = optuna.load_study(study_name=sys.argv[1], storage=f"sqlite:///outputs/optuna/{sys.argv[1]}.db")
for t in s.trials:
    print(t.number, t.state.name, "stale" if t.user_attrs.get("vforge:stale") else "",
          f"retry of {t.user_attrs['vforge:retry_of']}" if "vforge:retry_of" in t.user_attrs else "")
PY
