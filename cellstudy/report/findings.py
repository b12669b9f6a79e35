"""What a run found, per network, in plain terms: AUC with a 95% CI, chance, the baseline.

Pure functions on the run's tidy per-fold metrics (``experiment.collect``'s ``tidy``: columns
network, family, fold, regime, metric, value) and predictions; no TensorFlow. The results chapter
and the book's findings read these, so that every sentence there is computed, not typed.

Intervals. The k test folds of a cross-validation share most of their training cells, so the
fold-to-fold spread understates the uncertainty of a mean score. Every interval here uses the
Nadeau-Bengio corrected variance (``stats.corrected_resampled_ttest``; ``(1/k + n_test/n_train)
s^2``), as the statistics chapter does:

- a network's AUC: mean over folds, 95% CI = mean ± t_{0.975, k-1} · sqrt((1/k + n_test/n_train) s²),
  clipped to [0, 1] (AUC's range); it **beats chance** when the CI's lower end is above 0.5 (a one-sided test at 2.5 %);
- against the classical baseline: the paired per-fold difference (network − baseline) with the
  same corrected test, Holm-adjusted over the networks, and Cohen's d_z with its interval.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps

from cellstudy import config, networks, rundir
from cellstudy.report import stats
from cellstudy.learning.metrics import (DISPLAY_NAMES, NETWORK_FAMILY, NETWORK_ORDER, rank_models,
                                       stable_mean, summary_numeric)

CLASSICAL = networks.CLASSICAL


def fold_sizes(folds_csv: str | Path) -> tuple[float, float, int]:
    """``(n_train, n_test, k)`` of a run's folds file (``<run>/folds/<cohort>.csv``, read with
    ``folds.read_folds``: one row per cell with its test fold): the mean test-fold size and the rest of the
    cohort. Read from the folds file, not from the folds that ran."""
    from cellstudy.learning.folds import read_folds

    df, _ = read_folds(folds_csv)
    sizes = df["fold"].value_counts()
    n_test = float(sizes.mean())
    return float(len(df) - n_test), n_test, int(len(sizes))


def _ordered(names: Sequence[str]) -> list[str]:
    return networks.ordered(names, NETWORK_ORDER)


def _run_scale(run: Path, scale: str | None) -> dict | None:
    """The run's resolved scale from ``scale.json`` (None without one, or for another scale)."""
    f = rundir.Run(run).scale_file
    if not f.is_file():
        return None
    try:
        rec = rundir.read_scale_file(f)
    except rundir.RunFolderError:   # an unreadable scale.json: the named scale's values
        return None
    return rec["values"] if rec.get("name") == scale else None


def best_baseline(tidy: pd.DataFrame, metric: str = "auc_macro", regime: str = "long") -> str | None:
    """The classical model (family "Classical") with the highest fold-mean ``metric``; None if
    the run has none."""
    sub = tidy[(tidy["metric"] == metric) & (tidy["regime"] == regime)]
    sub = sub[sub["network"].map(NETWORK_FAMILY).eq(CLASSICAL) | sub.get("family", "").eq(CLASSICAL)]
    if sub.empty:
        return None
    return str(rank_models(summary_numeric(sub, [metric]))["network"].iloc[0])


def network_verdicts(tidy: pd.DataFrame, n_train: float, n_test: float, metric: str = "auc_macro",
                     regime: str = "long", baseline: str | None = "best", alpha: float = 0.05,
                     chance: float = 0.5) -> pd.DataFrame:
    """One row per model of the run (networks and classical models, book order).

    Columns: network, display, family, k, mean, sd, ci_low, ci_high, beats_chance, and against
    ``baseline`` (the best classical model by default; None: no comparison): baseline, diff,
    diff_low, diff_high, p, p_adj (Holm over the compared networks), d_z, d_z_low, d_z_high,
    versus ("better than" | "worse than" | "not distinguishable from", at ``alpha`` after
    Holm), note. The baseline's own row has no comparison.
    """
    sub = tidy[(tidy["metric"] == metric) & (tidy["regime"] == regime)].dropna(subset=["value"])
    if sub.empty:
        raise ValueError(f"no {metric!r} values for regime {regime!r} in the tidy metrics")
    wide = sub.pivot_table(index="fold", columns="network", values="value", aggfunc="first")
    base = best_baseline(tidy, metric, regime) if baseline == "best" else baseline
    if base is not None and base not in wide.columns:
        raise ValueError(f"baseline {base!r} has no {metric} values for regime {regime!r}")
    q = lambda k: float(sps.t.ppf(1 - alpha / 2, k - 1)) if k >= 2 else math.nan
    rows = []
    for net in _ordered(wide.columns):
        v = wide[net].dropna()
        k = len(v)
        mean, sd = stable_mean(v), float(v.std(ddof=1)) if k >= 2 else math.nan
        factor = (1.0 / k + n_test / n_train) if k >= 1 else math.nan
        half = q(k) * math.sqrt(factor) * sd if k >= 2 else math.nan
        row = {"network": net, "display": DISPLAY_NAMES.get(net, net),
               "family": NETWORK_FAMILY.get(net, "?"), "k": k, "mean": mean, "sd": sd,
               "ci_low": max(0.0, mean - half), "ci_high": min(1.0, mean + half),
               "beats_chance": bool(k >= 2 and mean - half > chance), "baseline": base, "note": ""}
        if base is not None and net != base:
            both = wide[[net, base]].dropna()
            if len(both) >= 2:
                tt = stats.corrected_resampled_ttest(both[net], both[base], n_train, n_test, alpha)
                es = stats.paired_effect_size(both[net], both[base], 1 - alpha, n_train, n_test)
                row.update(diff=tt["mean_diff"], diff_low=tt["ci_low"], diff_high=tt["ci_high"],
                           p=tt["p"], d_z=es["d_z"], d_z_low=es["ci_low"], d_z_high=es["ci_high"],
                           note=tt["note"])
            else:
                row["note"] = f"only {len(both)} fold(s) shared with {base}"
        rows.append(row)
    out = pd.DataFrame(rows)
    for c in ("diff", "diff_low", "diff_high", "p", "d_z", "d_z_low", "d_z_high"):
        if c not in out.columns:
            out[c] = math.nan
    out["p_adj"] = math.nan
    compared = out["p"].notna() & out["family"].ne(CLASSICAL)
    if compared.any():
        from statsmodels.stats.multitest import multipletests
        out.loc[compared, "p_adj"] = multipletests(out.loc[compared, "p"], method="holm")[1]

    def versus(r) -> str:
        if r["network"] == base or base is None or not np.isfinite(r["diff"]):
            return ""
        if np.isfinite(r["p_adj"]) and r["p_adj"] < alpha:
            return "better than" if r["diff"] > 0 else "worse than"
        if not np.isfinite(r["p_adj"]) and np.isfinite(r["p"]) and r["p"] < alpha:
            return "better than" if r["diff"] > 0 else "worse than"
        return "not distinguishable from"

    out["versus"] = out.apply(versus, axis=1)
    cols = ["network", "display", "family", "k", "mean", "sd", "ci_low", "ci_high", "beats_chance",
            "baseline", "diff", "diff_low", "diff_high", "p", "p_adj", "d_z", "d_z_low", "d_z_high",
            "versus", "note"]
    return out[cols]


def one_class_folds(predictions: pd.DataFrame, regime: str = "long") -> pd.DataFrame:
    """(network, fold) pairs whose argmax prediction is the same class for every test cell.

    ``predictions``: ``experiment.collect``'s predictions (network, fold, regime, y_pred)."""
    need = {"network", "fold", "regime", "y_pred"}
    if not need <= set(predictions.columns):
        raise ValueError(f"predictions lack column(s) {sorted(need - set(predictions.columns))}")
    p = predictions[predictions["regime"] == regime]
    g = p.groupby(["network", "fold"])["y_pred"].nunique().reset_index(name="classes")
    bad = g[g["classes"] < 2].copy()
    bad["predicted"] = [int(p[(p.network == r.network) & (p.fold == r.fold)]["y_pred"].iloc[0])
                        for r in bad.itertuples()]
    return bad[["network", "fold", "predicted"]].reset_index(drop=True)


def _fmt_ci(r, digits: int = 3) -> str:
    return f"{r['mean']:.{digits}f} (95% CI {r['ci_low']:.{digits}f}–{r['ci_high']:.{digits}f})"


def verdict_sentences(verdicts: pd.DataFrame, metric_label: str = "AUC") -> list[str]:
    """One plain sentence per model from :func:`network_verdicts`, e.g. "MHL: AUC 0.912 (95% CI
    0.85–0.97), above chance; not distinguishable from the random forest baseline (difference -0.05, 95% CI
    -0.12 to 0.02, Holm-adjusted p 0.31, d_z -0.9)"."""
    out = []
    for r in verdicts.itertuples(index=False):
        r = r._asdict()
        s = f"**{r['display']}**: {metric_label} {_fmt_ci(r)}, " + (
            "above chance" if r["beats_chance"] else "**not** above chance (its CI includes 0.5)")
        if r["versus"]:
            base = DISPLAY_NAMES.get(r["baseline"], r["baseline"])
            if NETWORK_FAMILY.get(r["baseline"]) == CLASSICAL:   # "the logistic regression baseline": a common noun
                base = base[:1].lower() + base[1:]
            adjusted = np.isfinite(r["p_adj"])
            p = r["p_adj"] if adjusted else r["p"]
            s += (f"; {r['versus']} the {base} baseline (difference {r['diff']:+.3f}, 95% CI "
                  f"{r['diff_low']:+.3f} to {r['diff_high']:+.3f}, "
                  + (f"Holm-adjusted p {p:.3g}" if adjusted else f"p {p:.3g}, not adjusted: a classical model, "
                     "outside the networks' Holm family") + f", d_z {r['d_z']:.2f})")
        elif r["family"] == CLASSICAL and r["network"] == r["baseline"]:
            s += "; the best classical baseline, against which the networks are compared"
        out.append(s + ".")
    return out


def summary_counts(verdicts: pd.DataFrame) -> dict[str, int]:
    """How many networks (not classical models) beat chance / are better, worse or not
    distinguishable from the baseline."""
    n = verdicts[verdicts["family"] != CLASSICAL]
    return {"networks": int(len(n)), "above_chance": int(n["beats_chance"].sum()),
            "better": int((n["versus"] == "better than").sum()),
            "worse": int((n["versus"] == "worse than").sum()),
            "indistinguishable": int((n["versus"] == "not distinguishable from").sum())}


def best_per_family(verdicts: pd.DataFrame) -> pd.DataFrame:
    """The best model of each family by ``metrics.rank_models`` (the higher mean, a round-off
    difference a tie, then the lower SD), in the book's order of families."""
    fams = list(dict.fromkeys(verdicts["family"]))
    ranked = rank_models(verdicts)
    return (ranked.groupby("family", sort=False).head(1)
            .set_index("family", drop=False).loc[fams].reset_index(drop=True))


# ---------------------------------------------------------------------------------------------
# The book's findings page, written from the run's own files
# ---------------------------------------------------------------------------------------------
#: The study's learning target (the issue "the default study learns"): the best network of each
#: family reaches a long-regime AUC-ROC macro, fold mean, of at least this value. The findings page
#: says, per family, whether the run met it.
LEARNING_TARGET_AUC = 0.90

STAIN_NAMES = {"third": "the third stain (tubulin)", "actin": "F-actin", "dna": "DNA", "shape": "cell / nucleus shape"}


#: (scale, book page, its title): the book's page of the measurements behind the default scale
#: (``book/default_scale.md``), which the findings of a run at that scale point to when a family
#: misses the learning target or a network is not on its plateau.
DEFAULT_SCALE_PAGE = ("cpu", "default_scale", "How the CPU default scale was chosen")

#: The cohort on whose folds the default scale's settings were chosen (book/default_scale.md).
DEFAULT_SCALE_COHORT = "bbbc021-paper"

#: What the findings of a run of that cohort at the default scale say about how the scale was chosen.
SELECTION_CAVEAT = (
    "**How the default scale was chosen, and what that means for these numbers.** Its settings "
    "(image size, rate and warm-up, the plateau rule, the RGB family's per-stain whitening and "
    "token width) were chosen by probes scored on these same test folds ({page}): the fold means "
    "above may be optimistic by about the spread between the settings tried (0.01-0.03 AUC). The "
    "unseen fields below took no part in any choice; read them as the check.")


def learning_target(best: pd.DataFrame, target: float = LEARNING_TARGET_AUC
                    ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``(met, short, inside)`` of the best network of each family (rows of :func:`best_per_family`
    of the networks): those whose fold mean reaches ``target``, those below it, and those whose 95%
    CI contains it (the folds cannot tell them from the target)."""
    met = best[best["mean"] >= target]
    short = best[best["mean"] < target]
    inside = best[(best["ci_low"] <= target) & (best["ci_high"] >= target)]
    return met, short, inside


def _read(path: Path) -> pd.DataFrame | None:
    try:
        return pd.read_csv(path) if path.is_file() else None
    except (OSError, ValueError, pd.errors.EmptyDataError):
        return None


def _run_config(layout: rundir.Run) -> dict:
    """The run's study config (``study.yaml``), ``{}`` when it has none."""
    import yaml

    return (yaml.safe_load(layout.study_config.read_text()) or {}) if layout.study_config.is_file() else {}


def _best_external(ext: pd.DataFrame) -> tuple[pd.Series | None, pd.Series | None]:
    """The unseen-fields rows (``external_metrics.csv``) with the highest AUC: the best network
    ensemble and the best classical model (None where a part has no AUC)."""
    out = []
    for part in (ext[ext["family"] != CLASSICAL], ext[ext["family"] == CLASSICAL]):
        part = part.dropna(subset=["auc"])
        out.append(part.loc[part["auc"].idxmax()] if len(part) else None)
    return out[0], out[1]


def _link(text: str, chapter: str) -> str:
    return f"[{text}]({chapter}.ipynb)"


def findings_page(run_dir: str | Path) -> dict:
    """The findings page of a finished run, from its CSVs: ``{"markdown": str, "numbers": {key:
    (value, "file:column/row")}, "verdicts": DataFrame}``.

    Reads ``07_results/verdicts_long.csv`` (required), ``external_metrics.csv``,
    ``convergence.csv``, ``one_class_folds.csv``, ``09_statistics/welch_tests.csv``,
    ``08_xai/channel_importance.csv`` / ``faithfulness.csv``,
    ``06_classical_baseline/stain_importance.csv``, the folds file and ``study.yaml``. A missing
    optional file makes its paragraph say so. Every number on the page is in ``numbers`` with the
    file it came from (the tests compare them); every paragraph links its chapter."""

    layout = rundir.Run(run_dir)
    run = layout.root
    v = _read(run / "07_results" / "verdicts_long.csv")
    if v is None or v.empty:
        raise FileNotFoundError(f"{run / '07_results' / 'verdicts_long.csv'} is missing: run 07_results first")
    cfg = _run_config(layout)
    cohort, scale = cfg.get("cohort", "?"), cfg.get("scale", "?")
    num: dict[str, tuple] = {}
    md: list[str] = ["# Findings", ""]
    # --- the cohort in one line
    fp = layout.folds_file(cohort, create=False)
    if fp.is_file():
        from cellstudy.learning.folds import read_folds
        ft, _ = read_folds(fp)
        n0, n1 = int((ft["label"] == 0).sum()), int((ft["label"] == 1).sum())
        nf, k = int(ft["group"].nunique()), int(ft["fold"].nunique())
        num.update(cells_normal=(n0, fp.name), cells_abnormal=(n1, fp.name), fields=(nf, fp.name))
        md.append(f"**Cohort** `{cohort}`: {n0} normal-role and {n1} abnormal-role cells from {nf} source fields, "
                  f"{k}-fold cross-validation grouped by field ({_link('cohort', '00_cohort')}); scale `{scale}`.")
    cvs = _read(run / "00_cohort" / "class_vs_source.csv")
    if cvs is not None and {"source", "shared by both classes"} <= set(cvs.columns):
        for _, row in cvs.iterrows():
            if str(row["shared by both classes"]).strip().lower() != "none":
                continue
            src = str(row["source"])
            num["confounded_with"] = (src, "class_vs_source.csv:source")
            md += ["", f"```{{important}}\nIn this cohort **the class coincides with the {src}**: normal-role cells "
                   f"come from {src} {row.get('normal cells from', '?')}, abnormal-role cells from "
                   f"{row.get('abnormal cells from', '?')}; no {src} holds both. Every number below measures class "
                   f"*or* {src} (its place on the plate, its staining), not the biology alone; the "
                   f"{_link('cohort chapter', '00_cohort')} says what the folds and the unseen fields can and cannot "
                   "separate.\n```"]
            break
    sc_run = _run_scale(run, scale)   # the run's resolved scale (None without scale.json)
    look = config.not_conclusive_note(scale, sc_run)
    if look:
        md += ["", f"```{{warning}}\n{look}\n```"]
    md.append("")
    # --- best of each family and the baseline
    nets = v[v["family"] != CLASSICAL]
    cl = v[v["family"] == CLASSICAL]
    base = v["baseline"].dropna().iloc[0] if v["baseline"].notna().any() else None
    md.append("## Performance (long regime, AUC-ROC, mean over the test folds, 95% CI)")
    md.append("")
    md.append(f"From {_link('the results chapter', '07_results')}:")
    md.append("")
    best = best_per_family(v)
    for r in best.itertuples():
        key = f"best_{r.family}"
        num[key] = (round(float(r.mean), 3), f"verdicts_long.csv:mean/{r.network}")
        tag = " (the classical baseline)" if r.family == CLASSICAL else ""
        md.append(f"- **{r.family}**{tag}: {r.display}, AUC **{r.mean:.3f}** (95% CI {r.ci_low:.3f}–{r.ci_high:.3f})"
                  + ("" if r.beats_chance else ", *not above chance*"))
    if (best["ci_high"] >= 1.0).any():
        md += ["", "(An interval that reaches 1.000 is cut there: an AUC cannot exceed 1.)"]
    md.append("")
    md += [f"```{{figure}} findings_auc.png\n:name: fig-findings-auc\n\nAUC-ROC per model, long regime: fold "
           f"mean with its 95% corrected CI; the solid black line is the learning target ({LEARNING_TARGET_AUC:.2f}), "
           "the dashed grey line the best classical model, the dotted line chance (the analog of the paper's "
           "Table 2, with intervals).\n```", ""]
    fam = best_per_family(nets) if len(nets) else nets
    missed_target = off_plateau = False   # either sends the reader to the default scale's page
    if len(fam):
        met, short, inside = learning_target(fam)
        missed_target = bool(len(short))
        num["families_at_target"] = (int(len(met)), "verdicts_long.csv:mean")
        txt = (f"**Learning target** (the best network of each family at AUC ≥ {LEARNING_TARGET_AUC:.2f}): "
               + (f"met by {int(len(met))} of {len(fam)} families ({', '.join(met['family'])})" if len(met)
                  else f"met by none of the {len(fam)} families"))
        T = LEARNING_TARGET_AUC
        if len(short):
            # bold only a shortfall the folds can tell (its CI below the target): one whose CI
            # contains the target is a point estimate on the wrong side of it, not a finding
            clear = short[short["ci_high"] < T]
            txt += "; not met by " + ", ".join(
                (f"**{r.family} (best: {r.display}, {r.mean:.3f})**" if r.network in set(clear["network"])
                 else f"{r.family} (best: {r.display}, {r.mean:.3f})") for r in short.itertuples())
        txt += "."
        num["families_ci_contains_target"] = (int(len(inside)), "verdicts_long.csv:ci_low,ci_high")
        if len(inside):
            who = (f"all {len(fam)} families' best networks" if len(inside) == len(fam)
                   else f"{int(len(inside))} of {len(fam)} families' best networks")
            one = len(inside) == 1
            txt += (f" The target compares point estimates: the 95% CIs of {who} contain {T:.2f} "
                    f"({', '.join(inside['family'])}), so the folds cannot tell whether "
                    f"{'that network is' if one else 'those networks are'} above or below {T:.2f} "
                    f"(how families compare with each other is the {_link('statistics', '09_statistics')} "
                    "chapter's paired tests).")
        md += [txt, ""]
    c = summary_counts(v)
    num.update(n_networks=(c["networks"], "verdicts_long.csv"), above_chance=(c["above_chance"], "verdicts_long.csv"),
               better=(c["better"], "verdicts_long.csv"), worse=(c["worse"], "verdicts_long.csv"))
    chance_txt = (f"{c['above_chance']} of {c['networks']} networks beat chance (CI above 0.5)"
                  + ("" if c["above_chance"] == c["networks"] else "; not above chance: "
                     + ", ".join(nets[~nets["beats_chance"].astype(bool)]["display"])) + ".")
    if base is not None and len(cl):
        b = v.set_index("network").loc[base]
        bname = DISPLAY_NAMES.get(base, base)
        if c["better"] == 0:
            vs = (f"**No network beats the classical baseline** ({bname}, AUC {b['mean']:.3f}): "
                  f"{c['worse']} {'is' if c['worse'] == 1 else 'are'} significantly worse and "
                  f"{c['indistinguishable']} cannot be told apart from it "
                  "(corrected paired t-test per network, Holm-adjusted).")
        else:
            vs = (f"{c['better']} network(s) beat the classical baseline ({bname}, AUC {b['mean']:.3f}) significantly; "
                  f"{c['worse']} are worse, {c['indistinguishable']} indistinguishable (corrected paired t-test, Holm).")
        md += [chance_txt + " " + vs, ""]
    else:
        md += [chance_txt, ""]
    # --- convergence and one-class folds
    conv = _read(run / "07_results" / "convergence.csv")
    one = _read(run / "07_results" / "one_class_folds.csv")
    if conv is not None and len(conv):
        nc = int(conv["converged"].astype(bool).sum())
        num["converged"] = (nc, "convergence.csv:converged")
        bad = [DISPLAY_NAMES.get(n, n) for n in _ordered(conv.loc[~conv["converged"].astype(bool), "network"])]
        off_plateau = bool(bad)
        stopped = ""
        capped = config.plateau_cap(sc_run or {}) is not None   # the long regime went on to the plateau
        if bad and "epochs" in conv.columns and conv["epochs"].notna().any():
            stopped = (f"; their numbers are those of a training stopped after {int(conv['epochs'].max())} "
                       f"epochs{' (the scale cap)' if capped else ''}, short of that plateau")
        span = ""
        if capped and {"epochs_min", "epochs"} <= set(conv.columns) and conv["epochs_min"].notna().all() \
                and int(conv["epochs_min"].min()) != int(conv["epochs"].max()):
            span = f" (the long regime: {int(conv['epochs_min'].min())}-{int(conv['epochs'].max())} epochs a fold)"
        md.append(f"**Training:** {nc} of {len(conv)} networks reached their training plateau in every fold"
                  + span + (f" (not: {', '.join(bad)}{stopped})" if bad else "") + "; "
                  + (f"{len(one)} (network, fold) pairs gave every test cell one class."
                     if one is not None and len(one) else "no network gave every cell of a test fold one class.")
                  + f" ({_link('results', '07_results')})")
        md.append("")
    if scale == DEFAULT_SCALE_PAGE[0] and cohort == DEFAULT_SCALE_COHORT:
        md += [SELECTION_CAVEAT.format(page=f"[{DEFAULT_SCALE_PAGE[2]}]({DEFAULT_SCALE_PAGE[1]}.md)"), ""]
    if scale == DEFAULT_SCALE_PAGE[0] and (missed_target or off_plateau):
        md += [f"What more epochs, another schedule, other seeds and other settings gave at this scale, "
               f"measured while it was chosen: [{DEFAULT_SCALE_PAGE[2]}]({DEFAULT_SCALE_PAGE[1]}.md).", ""]
    # --- unseen fields
    ext = _read(run / "07_results" / "external_metrics.csv")
    md.append("## Unseen fields")
    md.append("")
    if ext is not None and len(ext):
        en, ec = ext[ext["family"] != CLASSICAL], ext[ext["family"] == CLASSICAL]
        parts = [f"On {int(ext['n_cells'].max())} cells of {int(ext['n_fields'].max())} fields the cohort never uses "
                 f"({_link('external test', '07_results')}):"]
        bn, bc = _best_external(ext)
        if bn is not None:
            num["external_best_network"] = (round(float(bn["auc"]), 3), f"external_metrics.csv:auc/{bn['network']}")
            parts.append(f"the best network ensemble, {DISPLAY_NAMES.get(bn['network'], bn['network'])}, "
                         f"AUC **{bn['auc']:.3f}** ({bn['auc_ci_low']:.3f}–{bn['auc_ci_high']:.3f}); "
                         f"networks {en['auc'].min():.3f}–{en['auc'].max():.3f}")
        if bc is not None:
            num["external_best_classical"] = (round(float(bc["auc"]), 3), f"external_metrics.csv:auc/{bc['network']}")
            parts.append(f"; the classical {DISPLAY_NAMES.get(bc['network'], bc['network'])} "
                         f"AUC **{bc['auc']:.3f}** ({bc['auc_ci_low']:.3f}–{bc['auc_ci_high']:.3f})")
        line = " ".join(parts[:2]) + "".join(parts[2:]) + "."
        if len(en) and len(ec):
            cbest = float(ec["auc"].max())
            below = int((en["auc"] < cbest).sum())
            num["external_networks_below_classical"] = (below, "external_metrics.csv:auc")
            line += (f" **{below} of {len(en)} network ensembles score below the classical model** there"
                     if below else " Every network ensemble scores above the classical model there") + \
                " (point estimates; the chapter gives each its interval)."
        what = _external_provenance(cohort)
        md.append(line + (" " + what if what else ""))
    else:
        md.append("No external test in this run (no external set is defined for this cohort, or the results step did not write it).")
    md.append("")
    # --- Table 3
    md.append("## Families (the paper's Table 3)")
    md.append("")
    w = _read(run / "09_statistics" / "welch_tests.csv")
    if w is not None and len(w):
        sig = w[w["significant"].astype(bool)]
        num["table3_significant"] = (int(len(sig)), "welch_tests.csv:significant")
        if len(sig):
            label = {"recall_macro": "recall", "f1_macro": "F1", "precision_macro": "precision", "auc_macro": "AUC"}
            def _items(g_):
                return "; ".join(f"{a} vs {b}: " + ", ".join(label.get(m, m) for m in g["metric"])
                                 for (a, b), g in g_.groupby(["family_a", "family_b"], sort=False))
            long_ = sig[sig["regime"] == "long"]
            where = (f"in the long regime: {_items(long_)}" if len(long_) else
                     "none in the long regime, the regime of the study's results; in the "
                     + ", ".join(sorted(set(sig["regime"].astype(str)))) + f" regime: {_items(sig)}")
            md.append(f"{len(sig)} of {int(w['p'].notna().sum())} Welch tests (family pairs x metrics x regimes) are "
                      f"significant after Bonferroni; {where} "
                      f"({_link('statistics', '09_statistics')}; the tests treat a family's per-fold values as "
                      "independent, which they are not: the paired tests there are the honest comparison).")
        else:
            md.append(f"None of the {int(w['p'].notna().sum())} Welch tests between families is significant after "
                      f"Bonferroni ({_link('statistics', '09_statistics')}).")
    else:
        md.append("The statistics step did not run.")
    md.append("")
    # --- stains
    md.append("## Which stain drives the call")
    md.append("")
    ci = _read(run / "08_xai" / "channel_importance.csv")
    si = _read(run / "06_classical_baseline" / "stain_importance.csv")
    lines = []
    if ci is not None and len(ci):
        def _tops(frame):
            top_ = frame.loc[frame.groupby("network")["mean_drop"].idxmax()]
            return top_, top_["channel"].value_counts()

        def _count_text(counts_, n):
            return (f"{STAIN_NAMES.get(counts_.index[0], counts_.index[0])} matters most for {int(counts_.iloc[0])} "
                    f"of {n} networks" + "".join(f", {STAIN_NAMES.get(k, k)} for {int(c_)}"
                                                  for k, c_ in counts_.iloc[1:].items()))
        m = ci[ci["method"] == "mean"] if "mean" in set(ci["method"]) else ci
        top, counts = _tops(m)
        lead = counts.index[0]
        num["networks_top_stain"] = (str(lead), "channel_importance.csv")
        txt = (f"Networks (probability drop when a stain is replaced by its mean, {_link('explanations', '08_xai')}): "
               f"{_count_text(counts, len(top))}.")
        z = ci[ci["method"] == "zero"]
        if len(z) and "mean" in set(ci["method"]):
            ztop, zcounts = _tops(z)
            same = int((top.set_index("network")["channel"] == ztop.set_index("network")["channel"]).sum())
            if same < len(top):
                txt += (f" Set to 0 instead, {_count_text(zcounts, len(ztop))}: the two ways of removing a stain "
                        f"agree on the top stain for {same} of {len(top)} networks, so the ranking depends on how a "
                        "stain is removed.")
        if {"ci_low", "ci_high"} <= set(m.columns):
            overlap = 0
            for _, g in m.groupby("network"):
                g = g.sort_values("mean_drop", ascending=False)
                if len(g) >= 2 and g["ci_low"].iloc[0] <= g["ci_high"].iloc[1]:
                    overlap += 1
            num["stain_ci_overlap"] = (overlap, "channel_importance.csv:ci_low,ci_high")
            txt += (f" Replaced by its mean, for {overlap} of {len(top)} networks the top stain's 95% interval "
                    "overlaps the next stain's "
                    f"({int(m['n_cells'].max()) if 'n_cells' in m.columns else '?'} explained cells): "
                    "a ranking, not a measured difference." if overlap else
                    " Replaced by its mean, for every network the top stain's 95% interval lies above the next stain's.")
        lines.append(txt)
    if si is not None and len(si):
        tops = si.loc[si.groupby("classifier")["auc_drop_mean"].idxmax()]
        for r in tops.itertuples():
            num[f"classical_top_stain_{r.classifier}"] = (str(r.group), "stain_importance.csv")
        lines.append("Classical baseline (AUC drop when a stain's features are permuted, "
                     f"{_link('baseline', '06_classical_baseline')}): "
                     + "; ".join(f"{DISPLAY_NAMES.get(r.classifier, r.classifier)}: {STAIN_NAMES.get(r.group, r.group)} "
                                 f"(AUC drop {r.auc_drop_mean:.3f})" for r in tops.itertuples()) + ".")
    md.append(" ".join(lines) if lines else "No stain-importance results in this run.")
    md.append("")
    # --- faithfulness
    md.append("## Which explanation is faithful")
    md.append("")
    fa = _read(run / "08_xai" / "faithfulness.csv")
    if fa is not None and len(fa):
        ok = fa.groupby(["network", "method"])["beats_random"].all().reset_index()
        per = ok.groupby("method")["beats_random"].agg(["sum", "count"])
        gap = (fa.assign(gap=fa["difference"].abs()).groupby("method")["gap"].median().to_dict()
               if "difference" in fa.columns else {})
        for meth, g in gap.items():
            num[f"faithful_gap_{meth}"] = (round(float(g), 3), "faithfulness.csv:difference")
        for meth, r in per.iterrows():
            num[f"faithful_{meth}"] = (int(r["sum"]), "faithfulness.csv:beats_random")
        md.append("Deletion and insertion curves against a random order of pixels "
                  f"({_link('explanations', '08_xai')}): "
                  + "; ".join(f"{meth.replace('_', ' ')} beats random on both curves for {int(r['sum'])} of {int(r['count'])} networks"
                              + (f" (median distance from the random curve's area {gap[meth]:.3f})" if meth in gap else "")
                              for meth, r in per.iterrows()) + "."
                  + (" The distance is in units of the curve's area (0 to 1): a test can call a distance of a few "
                     "hundredths significant that changes little." if gap else ""))
    else:
        md.append("No faithfulness results in this run.")
    md.append("")
    return {"markdown": "\n".join(md) + "\n", "numbers": num, "verdicts": v}


def _external_provenance(cohort: str) -> str:
    """Where the unseen cells come from, from the two manifests (no image read): their classes, and
    whether they are new fields of the cohort's own wells (plates, experiments), which the unseen
    test then cannot tell from the class. "" when the study defines no external set for the cohort
    or a manifest cannot be read."""
    from cellstudy import data
    from cellstudy.report import external

    name = external.external_cohort_for(cohort)
    if name is None:
        return ""
    try:
        ct, et = data.load_manifest(cohort), data.load_manifest(name)
    except Exception:   # noqa: BLE001 - a sentence of the page, not worth stopping it for
        return ""
    lab = pd.to_numeric(et["label"], errors="coerce")
    out = f"They are {int((lab == 0).sum())} normal-role and {int((lab == 1).sum())} abnormal-role cells"
    if "well" in ct.columns and "well" in et.columns:
        # a well is named by its plate too where the manifests record one; BBBC021's do not
        key = ["plate", "well"] if "plate" in ct.columns and "plate" in et.columns else ["well"]
        ids = lambda t: set(map(tuple, t[key].astype(str).to_numpy()))  # noqa: E731
        named = "wells" if len(key) == 2 else "well positions (the manifests record no plate)"
        if ids(et) <= ids(ct):
            return (out + f" from other fields of the cohort's own {named}: a check on new fields, not on new "
                    f"wells (a well effect that goes with the class holds there too; "
                    f"{_link('cohort chapter', '00_cohort')}).")
        return out + f", partly from {named.split(' (')[0]} the cohort does not use."
    return out + "."


def findings_figure(verdicts: pd.DataFrame):
    """AUC with its CI per model (book order), a dashed line at the best classical model's mean
    and a dotted one at 0.5. Returns a matplotlib Figure."""
    from matplotlib.figure import Figure

    v = verdicts.reset_index(drop=True)
    fig = Figure(figsize=(7.5, 0.45 * len(v) + 1.2), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(v))[::-1]
    colours = {f: f"C{i}" for i, f in enumerate(dict.fromkeys(v["family"]))}
    for yi, r in zip(y, v.itertuples()):
        ax.errorbar(r.mean, yi, xerr=[[r.mean - r.ci_low], [r.ci_high - r.mean]], fmt="o", capsize=3,
                    color=colours[r.family], label=r.family)
    base = v[v["network"] == v["baseline"]]
    if len(base):
        ax.axvline(float(base["mean"].iloc[0]), ls="--", color="grey", lw=1,
                   label=f"best classical ({float(base['mean'].iloc[0]):.3f})")
    ax.axvline(LEARNING_TARGET_AUC, ls="-", color="black", lw=0.9, alpha=0.7,
               label=f"learning target ({LEARNING_TARGET_AUC:.2f})")
    ax.axvline(0.5, ls=":", color="black", lw=1, label="chance")
    ax.set_yticks(y, v["display"])
    ax.set_xlim(0.3, 1.02)
    ax.set_xlabel("AUC-ROC (long regime), mean over folds with 95% CI")
    h, lab = ax.get_legend_handles_labels()
    uniq = dict(zip(lab, h))
    ax.legend(uniq.values(), uniq.keys(), fontsize=8, frameon=False, loc="lower left")
    return fig


def shown_as(value) -> str:
    """How a recorded number of the findings page is written on it: a float with 3 decimals, an
    int as is, a stain by its name (``STAIN_NAMES``)."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    return STAIN_NAMES.get(str(value), str(value))


def expected_on_page(run_dir: str | Path) -> list[tuple[str, str]]:
    """What the rendered findings page must show, recomputed from the run's CSVs now:
    ``[(text, "key = text from source"), ...]`` for every number :func:`findings_page` records
    (the browser check looks for each text in the page)."""
    nums = findings_page(run_dir)["numbers"]
    return [(shown_as(v), f"{k} = {shown_as(v)} (from {src})") for k, (v, src) in nums.items()]


def write_findings_page(run_dir: str | Path, book_dir: str | Path) -> Path:
    """Write ``findings.md`` and ``findings_auc.png`` into ``book_dir`` (the assembled book) and
    ``findings_numbers.json`` beside it; returns the page's path."""
    import json

    book = Path(book_dir)
    page = findings_page(run_dir)
    fig = findings_figure(page["verdicts"])
    fig.savefig(book / "findings_auc.png", dpi=110)
    p = book / "findings.md"
    p.write_text(page["markdown"])
    (book / "findings_numbers.json").write_text(json.dumps({k: list(v) for k, v in page["numbers"].items()}, indent=1))
    return p


def console_summary(run_dir: str | Path) -> list[str]:
    """What a finished run found, in a few plain lines for the terminal at the end of ``cellstudy
    run`` / ``cellstudy workflow`` (the findings page, in the book, says it in full): the best model
    of each family with its long-regime AUC and 95% CI, the learning target, the networks against
    the classical baseline, the training plateau, the unseen fields, and what the prediction step
    did (or why it predicted nothing). Empty when the run has no results chapter
    (``07_results/verdicts_long.csv``). A part that cannot be read says so on its own line; the
    others are still printed."""
    layout = rundir.Run(run_dir)
    run = layout.root
    v = _read(run / "07_results" / "verdicts_long.csv")
    if v is None or v.empty:
        return []
    out = ["What this run found (long regime, AUC-ROC: fold mean, 95% CI; the book's findings page has the rest):"]
    for name, part in (("scale", _said_scale), ("models", _said_models), ("baseline", _said_baseline),
                       ("training", _said_training), ("unseen fields", _said_unseen), ("11_predict", _said_predict)):
        try:
            out += ["  " + line for line in part(layout, v)]
        except Exception as e:   # noqa: BLE001 - one unreadable part does not hide the others
            out.append(f"  ({name}: could not be read: {type(e).__name__}: {e})")
    return out


def _said_scale(layout: rundir.Run, v: pd.DataFrame) -> list[str]:
    scale = _run_config(layout).get("scale", "?")
    look = config.not_conclusive_note(scale, _run_scale(layout.root, scale))
    return [look.replace("**", "").replace("`", "'")] if look else []


def _said_models(layout: rundir.Run, v: pd.DataFrame) -> list[str]:
    best = best_per_family(v)
    width = max(len(str(f)) for f in best["family"])
    lines = [f"{str(r.family) + ':':<{width + 1}} {r.display} {r.mean:.3f} ({r.ci_low:.3f}-{r.ci_high:.3f})"
             + ("" if r.beats_chance else ", not above chance") for r in best.itertuples()]
    fam = best[best["family"] != CLASSICAL]
    if len(fam):
        met, short, inside = learning_target(fam)
        T = LEARNING_TARGET_AUC
        line = (f"learning target (each family's best >= {T:.2f}): "
                + (f"met by {', '.join(met['family'])}" if len(met) else "met by no family")
                + (f"; not by {', '.join(short['family'])}" if len(short) else ""))
        if len(inside):
            line += (f" (the 95% CI of {', '.join(inside['family'])} contains {T:.2f}: the folds cannot tell "
                     "whether it is above or below)")
        lines.append(line)
    return lines


def _said_baseline(layout: rundir.Run, v: pd.DataFrame) -> list[str]:
    c = summary_counts(v)
    base = v["baseline"].dropna().iloc[0] if "baseline" in v and v["baseline"].notna().any() else None
    if base is None or not c["networks"]:
        return []
    return [f"against the classical baseline ({DISPLAY_NAMES.get(base, base)}): "
            + (f"{c['better']} network(s) better" if c["better"] else "no network better")
            + f", {c['worse']} worse, {c['indistinguishable']} not distinguishable (corrected paired t-test, Holm)"]


def _said_training(layout: rundir.Run, v: pd.DataFrame) -> list[str]:
    conv = _read(layout.root / "07_results" / "convergence.csv")
    one = _read(layout.root / "07_results" / "one_class_folds.csv")
    if conv is None or not len(conv):
        return []
    return [f"training: {int(conv['converged'].astype(bool).sum())} of {len(conv)} networks on their training "
            "plateau in every fold; "
            + (f"{len(one)} time(s) a network called every cell of a test fold the same class"
               if one is not None and len(one) else "no network called every cell of a test fold the same class")]


def _said_unseen(layout: rundir.Run, v: pd.DataFrame) -> list[str]:
    ext = _read(layout.root / "07_results" / "external_metrics.csv")
    if ext is None or not len(ext):
        return []
    parts = [f"{label} {DISPLAY_NAMES.get(r['network'], r['network'])} {r['auc']:.3f}"
             for label, r in zip(("best network ensemble", "best classical"), _best_external(ext)) if r is not None]
    return [f"unseen fields ({int(ext['n_cells'].max())} cells the cohort never uses): " + ", ".join(parts)] if parts else []


def _said_predict(layout: rundir.Run, v: pd.DataFrame) -> list[str]:
    import json

    if not layout.executed("11_predict").is_file():
        return []
    pj = layout.step("11_predict", create=False) / "predictions" / "prediction.json"
    if not pj.is_file():
        return ["11_predict: no new cells predicted (the cohort has no fields it never uses); apply the run to "
                f"your own cells with: cellstudy predict {layout.root} CELLS.csv -o OUT"]
    info = json.loads(pj.read_text())
    m = info.get("scored_against_labels") or {}
    net = info.get("network", "?")
    line = (f"11_predict: {info.get('n_cells', '?')} cells of {Path(str(info.get('cells', '?'))).name} predicted by "
            f"{DISPLAY_NAMES.get(net, net)}")
    if m.get("auc") is not None:
        ci = (f" ({m['auc_ci_low']:.3f}-{m['auc_ci_high']:.3f})"
              if m.get("auc_ci_low") is not None and m.get("auc_ci_high") is not None else "")
        line += f"; AUC {m['auc']:.3f}{ci} against their classes"
    elif info.get("not_scored_why"):
        line += f"; {info['not_scored_why']}"
    return [line]
