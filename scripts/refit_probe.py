"""Probe (docs/accuracy.md, "The network judged on thin evidence"): the network given the ridge's kind of evidence.

For each window of a ``scripts/accuracy.py suite`` folder (its cached networks), refit the network (same config,
early-stopped on the last 15% of its dates) on the dates before each inner walk-forward block of the do-no-harm gate
(train + validation), predict the block; choose the quoted rows' blend on those fold dates (out of sample for both
the network and the ridge) instead of on the validation block, and score both choices on test (quoted rows, over
persistence, without the LightGBM step). One JSON line per window, then a summary per (group, kind)::

    python scripts/refit_probe.py <suite folder> china_thin_calls china_thin

``REFIT_LAST=k``: the network judged on the last ``k`` blocks only (its refits nearest the network served).
"""
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy as A  # noqa: E402

LAST = int(os.environ.get("REFIT_LAST", "0"))  # judge the network on the last this many blocks only (0: all)

from vforge.data.dataset import Split, inner_folds  # noqa: E402
from vforge.train import fit_options, new_model, training_parts  # noqa: E402
from vforge.training.callbacks import fit_callbacks  # noqa: E402
from vforge.training.gating import RIDGE, _score, choose_blend, clip_like, gate, shrink_ridge, wins_over  # noqa: E402
from vforge.training.loop import fit, predict  # noqa: E402
from vforge.training.losses import as_loss  # noqa: E402


def take(s: Split, idx: np.ndarray) -> Split:
    t = torch.as_tensor(idx)
    return Split(s.x_num[t], None if s.x_cat is None else s.x_cat[t], s.y[t], s.iv[idx], s.base[idx],
                 s.persistence[idx], s.rows.iloc[idx].reset_index(drop=True), {k: v[t] for k, v in s.aux.items()})


def cat(a: Split, b: Split) -> Split:
    import pandas as pd
    return Split(torch.cat([a.x_num, b.x_num]), None if a.x_cat is None else torch.cat([a.x_cat, b.x_cat]),
                 torch.cat([a.y, b.y]), np.concatenate([a.iv, b.iv]), np.concatenate([a.base, b.base]),
                 np.concatenate([a.persistence, b.persistence]), pd.concat([a.rows, b.rows], ignore_index=True),
                 {k: torch.cat([a.aux[k], b.aux[k]]) for k in a.aux})


def one(group, seed, kind, out):
    overrides = [*A.GROUPS[group][0], *A.seed_overrides(group, seed, out), "evaluation.plots=false",
                 "trainer.num_threads=1", "do_no_harm.lightgbm=false"]
    run_dir = out / f"{group}-{seed if seed is not None else 'default'}"
    cfg = A.compose_cfg(overrides, run_dir, f"mlp-{group}")
    torch.set_num_threads(1)
    data = instantiate(cfg.data, _convert_="all")
    saved = torch.load(run_dir / "model.pt", weights_only=False)
    config = OmegaConf.to_container(cfg, resolve=True)
    config["model"] = saved["config"]["model"]
    net = instantiate(config["model"], n_num=data.n_num, cat_cardinalities=data.cat_cardinalities, d_out=1)
    net.load_state_dict(saved["state_dict"])
    net.eval()
    d = cfg.do_no_harm
    _, _, choice = gate(net, data, model_cfg=config["model"], model_name="mlp", weights=list(d.weights),
                             trim=float(d.trim), tolerance=float(d.tolerance), max_p=float(d.max_p),
                             max_p_ridge=float(d.max_p_ridge), cap=float(d.cap), se=float(d.se))
    # the ridge served and its fold predictions at the quoted rows' penalty
    tr, va, te = data.train, data.val, data.test
    true_val = (va.iv - va.base) / data.y_scale
    tv = cat(tr, va)
    prev_tv = np.isfinite(tv.persistence)
    clipped = clip_like(tr.y.numpy().reshape(-1), np.isfinite(tr.persistence), true_val, np.isfinite(va.persistence))
    y_fit = torch.cat([tr.y.reshape(-1), torch.as_tensor(clipped, dtype=tr.y.dtype)])  # as the gate fits its folds
    tv = dataclasses.replace(tv, y=y_fit)
    dates = tv.aux["quote_date_idx"].numpy()
    true_all = (tv.iv - tv.base) / data.y_scale
    blocks = inner_folds(dates, int(d.get("n_folds", 4)), float(d.get("fold_fraction", 0.5)))
    probe = instantiate(RIDGE, n_num=data.n_num, cat_cardinalities=data.cat_cardinalities, d_out=1)
    probe.prepare(data)
    alphas = list(probe.alphas)
    mask, oos_all = probe.fold_path(tv.x_num, tv.x_cat, tv.y.double(), dates, blocks, alphas)
    # the network refit per block
    oos_n = np.zeros(len(tv))
    loss_fn = as_loss(instantiate(cfg.loss, _convert_="all"))
    judged = blocks[-LAST:] if LAST else blocks  # the blocks the network is judged on
    for b in judged:
        before = np.unique(dates[dates < b[0]])
        n_val = max(3, int(round(0.15 * len(before))))
        fit_d, val_d = before[:-n_val], before[-n_val:]
        rows = lambda ds: np.flatnonzero(np.isin(dates, ds))  # noqa: E731
        sub = dataclasses.replace(data, train=take(tv, rows(fit_d)), val=take(tv, rows(val_d)),
                                  test=take(tv, rows(b)))
        torch.manual_seed(int(cfg.seed))
        model = new_model(cfg, sub, 1, torch.device("cpu"))
        opt, sch, avg = training_parts(cfg, model, len(sub.train))
        cbs = fit_callbacks(averaging=avg, patience=cfg.trainer.patience, logger=None, checkpoint=None, progress=False,
                            extra=[], user=[])
        res = fit(model, sub, loss_fn=loss_fn, optimizer=opt, scheduler=sch, callbacks=cbs,
                  generator=torch.Generator().manual_seed(int(cfg.seed)), **fit_options(cfg.trainer))
        oos_n[rows(b)] = predict(res.model.eval(), sub.test)
    # the quoted rows' decision on the fold dates
    f = mask & prev_tv
    simple = shrink_ridge(oos_all[f], true_all[f], dates[f], weights=list(d.weights), trim=float(d.trim),
                          tolerance=float(d.tolerance), max_p=float(d.max_p_ridge), cap=float(d.cap), alphas=alphas,
                          se=float(d.se))  # the gate's simple choice, exactly
    oos_r = oos_all[:, alphas.index(simple["alpha"])]
    ws = simple["w_linear"]
    g = f & np.isin(dates, np.concatenate(judged))
    blend = choose_blend(oos_n[g], oos_r[g], true_all[g], dates[g], weights=list(d.weights), trim=float(d.trim),
                         tolerance=float(d.tolerance), cap=float(d.cap))
    simple_score = _score(ws * oos_r[g], true_all[g], dates[g], float(d.trim), float(d.cap))
    _, _, p = wins_over(blend["w_model"] * oos_n[g] + blend["w_linear"] * oos_r[g], ws * oos_r[g], true_all[g],
                          dates[g], float(d.cap))
    if blend["w_model"] > 0 and blend["score"] < simple_score - float(d.tolerance) and p <= float(d.max_p):
        wm, wl = blend["w_model"], blend["w_linear"]
    else:
        wm, wl = 0.0, ws
    served = instantiate(RIDGE, n_num=data.n_num, cat_cardinalities=data.cat_cardinalities, d_out=1)
    served.prepare(data)  # the ridge the gate serves: fit on train at the penalties it chose
    served.fit_closed_form(tr.x_num, tr.x_cat, tr.y, tr.aux["quote_date_idx"].numpy(),
                           alpha=(choice["alpha"], choice["alpha_new"]))
    own_te, lin_te = predict(net, te), predict(served, te)
    c = -data.y_center / data.y_scale  # the model's output for no change

    def ratio(w_m, w_l):
        ch = w_m * (own_te - c) + w_l * (lin_te - c) + c
        return A.prev_quoted_ratio(data.to_level(ch, te), te)
    return {"group": group, "seed": seed, "kind": kind, "gate": [choice["w_model"], choice["w_linear"]],
            "gate_ratio": ratio(choice["w_model"], choice["w_linear"]), "refit": [wm, wl], "refit_ratio": ratio(wm, wl),
            "fold_dates": int(len(np.unique(dates[g]))), "p": p, "blend": [blend["w_model"], blend["w_linear"]]}


def summary(rows: list[dict]) -> str:
    lines = ["group, kind, windows: geometric mean gate / refit, worst gate / refit, windows above 1, network kept"]
    for key in dict.fromkeys((r["group"], r["kind"]) for r in rows):
        rs = [r for r in rows if (r["group"], r["kind"]) == key]
        geo = {k: math.exp(np.mean([math.log(r[k]) for r in rs])) for k in ("gate_ratio", "refit_ratio")}
        lines.append(f"{key[0]} {key[1]} {len(rs)}: {geo['gate_ratio']:.3f} / {geo['refit_ratio']:.3f}, "
                     f"{max(r['gate_ratio'] for r in rs):.3f} / {max(r['refit_ratio'] for r in rs):.3f}, "
                     f"{sum(r['gate_ratio'] > 1 for r in rs)} / {sum(r['refit_ratio'] > 1 for r in rs)}, "
                     f"{sum(r['gate'][0] > 0 for r in rs)} / {sum(r['refit'][0] > 0 for r in rs)}")
    return "\n".join(lines)


if __name__ == "__main__":
    out, rows = Path(sys.argv[1]), []
    for group in sys.argv[2:]:
        _, tune, held = A.GROUPS[group]
        for kind, seeds in (("tune", tune), ("held-out", held)):
            for seed in seeds:
                rows.append(one(group, seed, kind, out))
                print(json.dumps(rows[-1]), flush=True)
    print(summary(rows))
