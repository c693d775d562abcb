"""Evaluate saved runs of mnist_gauss.py / mnist_uniform.py / cifar_ssl.py (Section 5).
The first word names the mode; `python evaluate.py MODE -h` describes it and its flags.

    python evaluate.py figure runs/sweep [RUN_DIR ...] --out figure1
    python evaluate.py compare RUN_DIR ... --against RUN_DIR ...
    python evaluate.py curve RUN_DIR ... --out curve
    python evaluate.py factor RUN_DIR ... --by aug_sigma --out factor
    python evaluate.py table runs/cifar_ssl [RUN_DIR ...] --out table1
    python evaluate.py outliers RUN_DIR ... [--out PREFIX]
    python evaluate.py embeddings FILE [--uniform] [--key NAME] [--out report]
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.special
import scipy.stats
from matplotlib.figure import Figure  # drawn without pyplot: the Agg renderer, no display

import common

Run = Row = dict[str, Any]
KINDS = ("trained", "no noise", "untrained")  # the order of table rows

# The panels of Figure 1: (column, entry of metrics.json, title); nan where a test was not run
METRICS = [("dagostino_p", "normality.dagostino_p", "D'Agostino-Pearson p (average)"),
           ("shapiro_p", "normality.shapiro_p", "Shapiro-Wilk p (average)"),
           ("henze_zirkler_p", "normality.henze_zirkler_p", "Henze-Zirkler p (average)"),
           ("sliced_w2", "normality.sliced_w2", "sliced W2 to N(0, I)"),
           ("min_eigenvalue", "normality.correlation.smallest_eigenvalues.0",
            "smallest correlation eigenvalue"),
           ("collapsed", "normality.correlation.collapsed",
            f"correlation eigenvalues < {common.COLLAPSED:g}"),
           ("mi_heldout", "mi_heldout", "MI estimate (nats)"),
           ("gnb_acc", "downstream.gnb_acc", "GaussianNB accuracy"),
           ("knn_acc", "downstream.knn_acc", "k-NN accuracy"),
           ("mlp_acc", "downstream.mlp_acc", "MLP accuracy"),
           ("silhouette", "downstream.silhouette", "silhouette")]
# Uniform DM adds tests against U[0, 1] (Section 3.2); cifar_ssl.py runs show their probes
PANELS = {"sigma": METRICS,
          "eps": METRICS + [("ks_p_mean", "uniformity.ks_p_mean", "Kolmogorov-Smirnov p (mean)"),
                            ("ks_stat_max", "uniformity.ks_stat_max",
                             "Kolmogorov-Smirnov D (max)")],
          "ssl": METRICS[:6] + [("top1", "probe.top1", "linear probe top-1"),
                                ("top5", "probe.top5", "linear probe top-5"),
                                ("online_top1", "online_probe.test_top1", "online probe top-1")]}
# Family (mnist_gauss.py, mnist_uniform.py, cifar_ssl.py) -> (name, symbol, capacity equation)
FAMILIES = {"sigma": ("Gaussian", "σ", "eq. 5"), "eps": ("uniform", "ε", "eq. 6"),
            "ssl": ("SSL Gaussian", "σ", "eq. 5")}
# Family -> (settings all runs of a figure share, those the trained runs and each baseline share)
SETTINGS = {"sigma": (("dim", "data.dataset", "data.split", "data.n_train", "data.n_test",
                       "normality.subsample"), ("critic", "loss", "steps", "batch_size")),
            "ssl": (("dim", "data.dataset", "data.n_train", "probe_images.train",
                     "probe_images.test", "normality.subsample"),
                    ("method", "arch", "steps", "batch_size"))}
SETTINGS["eps"] = SETTINGS["sigma"]
# Paper Table 1 (800 epochs): (CIFAR-10 top-1, top-5, CIFAR-100 top-1, top-5) in %
PAPER_TABLE1 = {
    ("simclr", 0.0): (90.83, 99.76, 65.64, 89.91), ("simclr", 0.1): (90.96, 99.72, 67.03, 90.49),
    ("simclr", 0.3): (91.56, 99.77, 65.72, 89.76), ("simclr", 0.5): (90.51, 99.74, 65.58, 89.56),
    ("vicreg", 0.0): (90.63, 99.67, 65.71, 88.96), ("vicreg", 0.1): (91.09, 99.68, 68.92, 90.50),
    ("vicreg", 0.3): (90.75, 99.61, 67.31, 89.89), ("vicreg", 0.5): (91.02, 99.75, 66.52, 89.66)}
# Poster Table 2 (VICReg, 100 epochs): sigma -> (IN-100, IN-1k) x (top-1, top-5), mean, std in %
PAPER_TABLE2 = {0.0: ((72.18, 0.40), (92.02, 0.12), (67.41, 0.17), (87.43, 0.08)),
                0.05: ((72.27, 0.38), (91.99, 0.18), (67.29, 0.20), (87.47, 0.06)),
                0.1: ((72.07, 0.27), (91.65, 0.13), (67.30, 0.13), (87.43, 0.02)),
                0.2: ((71.68, 0.50), (91.61, 0.24), (67.19, 0.12), (87.32, 0.09))}
TABLE_DATASETS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
TABLE2_DATASETS = {100: "ImageNet-100", 1000: "ImageNet-1k"}  # by the ImageFolder's classes
METHOD_NAMES = {"simclr": "SimCLR", "vicreg": "VICReg"}
MIN_POINTS = 8  # the fewest points the tests take (scipy's D'Agostino-Pearson test needs 8)


class Refused(Exception):
    """Input a mode cannot use: main prints it as one line on stderr and exits with code 2."""


# --- Runs in, files out ------------------------------------------------------------------------
def save(prefix: str, files: dict[str, str | Figure]) -> None:
    """PREFIX.SUFFIX per entry (text, or a figure), through a temporary name and a rename."""
    for suffix, content in files.items():
        path = Path(f"{prefix}.{suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        if isinstance(content, str):
            tmp.write_text(content)
        else:
            content.savefig(tmp, format=suffix, dpi=150, bbox_inches="tight")
        os.replace(tmp, path)


def entry(run: Run, dotted: str, kind: type | tuple[type, ...] = (int, float)) -> Any:
    """The entry "a.b.0" (saved["a"]["b"][0]) of a run's metrics.json, checked to be a `kind`
    (default a number; null, a test not run, is nan): every read of a run goes through here."""
    tree = run["saved"]
    try:
        for part in dotted.split("."):
            tree = tree[int(part)] if isinstance(tree, list) else tree[part]
    except (KeyError, IndexError, TypeError, ValueError):
        raise Refused(f"{run['file']} lacks the entry {dotted}") from None
    if tree is None and kind == (int, float):
        return math.nan
    if not isinstance(tree, kind):
        raise Refused(f"{run['file']}: the entry {dotted} holds a {type(tree).__name__}")
    return tree


def load_run(path: Path) -> Run:
    """The run in path/metrics.json: family (mnist_gauss.py "sigma", mnist_uniform.py "eps",
    cifar_ssl.py "ssl"), noise, capacity, seed, kind, panel values, null draws, settings."""
    file = path / "metrics.json"
    try:
        saved = json.loads(file.read_text())
    except ValueError as err:  # also a file that is not UTF-8 (UnicodeDecodeError)
        raise Refused(f"{file} is not valid JSON ({err})") from None
    saved = saved if isinstance(saved, dict) else {}
    family = "ssl" if "method" in saved else "eps" if "eps" in saved else "sigma"
    run = {"path": path, "file": file, "saved": saved, "family": family,
           "noise_key": "eps" if family == "eps" else "sigma"}
    run.update(noise=entry(run, run["noise_key"]), capacity=entry(run, "capacity"),
               seed=entry(run, "seed", int),
               mi_se=math.nan if family == "ssl" else entry(run, "mi_heldout_se"),
               diverged=[] if family == "ssl" else entry(run, "diverged", list),
               values={name: entry(run, key) for name, key, _ in PANELS[family]},
               null={name: entry(run, f"normality.null.{name}.values", list)
                     for name, band in entry(run, "normality.null", dict).items()
                     if isinstance(band, dict)},
               settings={key: entry(run, key, object)
                         for key in SETTINGS[family][0] + SETTINGS[family][1]})
    if not all(isinstance(v, (int, float)) for draws in run["null"].values() for v in draws):
        raise Refused(f"{file}: a null draw in normality.null is not a number")
    run["kind"] = ("untrained" if entry(run, "steps") == 0
                   else "no noise" if math.isinf(run["capacity"]) else "trained")
    return run


def load_runs(paths: list[str]) -> list[Run]:
    """The runs (folders holding metrics.json) at or below each path, sorted, of one script."""
    found: dict[Path, None] = {}
    for path in map(Path, paths):
        runs = sorted(file.parent for file in path.rglob("metrics.json")) if path.is_dir() else []
        if not runs:
            raise Refused(f"{path} holds no metrics.json of a run" if path.exists()
                          else f"{path} does not exist")
        found.update((run.resolve(), None) for run in runs)
    runs = [load_run(path) for path in found]
    if other := next((run for run in runs if run["family"] != runs[0]["family"]), None):
        raise Refused(f"cannot mix {runs[0]['path']} ({FAMILIES[runs[0]['family']][0]}) and "
                      f"{other['path']} ({FAMILIES[other['family']][0]})")
    return runs


def healthy(runs: list[Run]) -> tuple[list[Run], str]:
    """The runs that did not diverge, and lines naming those that did (metrics.json "diverged",
    common.divergence): a diverged run is no result, counted apart and never averaged in."""
    return [run for run in runs if not run["diverged"]], "".join(
        f"\ndiverged, left out: {os.path.relpath(run['path'])} ({'; '.join(run['diverged'])})"
        for run in runs if run["diverged"])


def check_group(runs: list[Run], keys: tuple[str, ...], what: str, seeds_of: str = "") -> None:
    """Refuse runs averaged together that differ in one of `keys` or, with `seeds_of`, a seed."""
    for key in keys:
        for run in runs[1:]:
            if run["settings"][key] != runs[0]["settings"][key]:
                raise Refused(f"{runs[0]['path']} and {run['path']} differ in {key} "
                              f"({runs[0]['settings'][key]!r} vs {run['settings'][key]!r}): "
                              f"{what} must share it")
    seeds: dict[int, Path] = {}
    for run in runs if seeds_of else []:
        if seeds.setdefault(run["seed"], run["path"]) != run["path"]:
            raise Refused(f"{seeds[run['seed']]} and {run['path']} are both seed {run['seed']} "
                          f"of {seeds_of}: pass only one of them")


# --- Tables: rows of kind, noise, capacity, seeds and (mean, 99% t half-width) per measure ----
def mean_ci99(values: list[float]) -> tuple[float, float]:
    """Mean and half-width t_{0.995, n-1} s / sqrt(n) of the 99% Student t interval over n
    seeds (s: ddof 1; nan for one value or an infinite one, C - I_hat at sigma = 0). The paper's
    Figure 1 uses z_{0.995} = 2.576."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2 or not np.isfinite(x).all():
        return float(x.mean()), math.nan
    t = float(scipy.stats.t.ppf(0.995, len(x) - 1))
    return float(x.mean()), t * float(x.std(ddof=1)) / math.sqrt(len(x))


def table_row(kind: str, noise: float, capacity: float, values: list[dict[str, float]],
              diverged: int = 0) -> Row:
    """The row of a group of seeds, each measure of `values` as mean_ci99 over the seeds, and the
    count of the group's diverged runs, left out of the means."""
    return {"kind": kind, "noise": noise, "capacity": capacity, "seeds": len(values),
            "diverged": diverged,
            **{name: mean_ci99([v[name] for v in values]) for name in values[0]}}


def fmt(x: float) -> str:
    """A table cell: 3 decimals, scientific for tiny p-values and huge (diverged NWJ) values."""
    if not math.isfinite(x):
        return str(x)
    return f"{x:.1e}" if 0 < abs(x) < 1e-3 or abs(x) >= 1e6 else f"{x:.3f}"


def mean_cell(value: tuple[float, float], number: Any = fmt) -> str:
    """ "mean ± spread", or the mean alone where the spread is nan (a single seed)."""
    return number(value[0]) + ("" if math.isnan(value[1]) else f" ± {number(value[1])}")


def row_cells(row: Row, measures: list[str], number: Any = fmt) -> list[str]:
    """A row's markdown cells: kind, noise, C, seeds (+ diverged), then each measure's mean_cell."""
    return [row["kind"], f"{row['noise']:g}", fmt(row["capacity"]),
            f"{row['seeds']}" + (f" (+{row['diverged']} diverged)" if row["diverged"] else ""),
            *(mean_cell(row[name], number) for name in measures)]


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table: first column left-aligned, the others right-aligned."""
    return "\n".join(["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1),
                      *("| " + " | ".join(row) + " |" for row in rows)])


def csv_text(rows: list[Row], noise_key: str = "noise", newline: str = "\n") -> str:
    """Rows as CSV: kind, noise, capacity, seeds, diverged, NAME_mean and NAME_ci99 per measure
    (no cell holds a comma or a quote, so none is quoted)."""
    measures = list(rows[0])[5:]  # the keys after kind, noise, capacity, seeds, diverged
    lines = [["kind", noise_key, "capacity", "seeds", "diverged",
              *(f"{name}_{stat}" for name in measures for stat in ("mean", "ci99"))]]
    lines += [[row["kind"], row["noise"], row["capacity"], row["seeds"], row["diverged"],
               *(value for name in measures for value in row[name])] for row in rows]
    return "".join(",".join(map(str, line)) + newline for line in lines)


# --- figure: Figure 1 from many runs ----------------------------------------------------------
def null_bands(runs: list[Run], k: int) -> dict[str, list[float]]:
    """[low, high] per panel: common.null_band of a mean of k of the runs' null draws."""
    pools: dict[str, dict[int, list[float]]] = {}
    for run in runs:
        for name, values in run["null"].items():
            pools.setdefault(name, {})[run["seed"]] = values
    return {name: common.null_band(np.concatenate(list(pool.values())), k)
            for name, pool in pools.items()}


def plot_figure1(rows: list[Row], metrics: list, symbol: str, title: str, bands: dict,
                 against_noise: bool, k: int) -> Figure:
    """Figure 1: each metric against C (or the noise), mean ± 99% t interval. Dashed: I = C;
    dotted: C = log 10; dash-dotted: the baselines; grey: the null bands of a mean of k."""
    nrows = math.ceil(len(metrics) / 4)
    fig = Figure(figsize=(16.8, 3.4 * nrows))
    axes = fig.subplots(nrows, 4, squeeze=False)
    trained = [row for row in rows if row["kind"] == "trained"]
    capacity = [row["capacity"] for row in trained]
    x = [row["noise"] for row in trained] if against_noise else capacity
    for ax, (name, _, panel) in zip(axes.flat, metrics, strict=False):
        ax.errorbar(x, [row[name][0] for row in trained], capsize=3, color="C0", fmt="o-",
                    yerr=np.nan_to_num([row[name][1] for row in trained]),
                    label="trained: mean ± 99% t interval")
        for i, row in enumerate(row for row in rows if row["kind"] != "trained"):
            ax.axhline(row[name][0], color=f"C{i + 1}", linestyle="-.",
                       label=(f"{symbol} = 0 (no noise)" if row["kind"] == "no noise"
                              else f"untrained encoder ({symbol} = {row['noise']:g})"))
        if name in bands:
            ax.axhspan(*bands[name], color="0.5", alpha=0.3, label=f"null band: central "
                       f"{100 * common.BAND_SHARE:g}% of means of {k} N(0, I) samples")
        if name == "mi_heldout":  # through a plotted point, so that it does not stretch the axes
            ax.axline((capacity[0], capacity[0]), slope=1, color="k", linestyle="--",
                      linewidth=1, label="bound I = C")
        if not against_noise:
            ax.axvline(common.LOG10, color="gray", linestyle=":", label="C = log 10")
        ax.set(title=panel, xlabel=f"noise {symbol}" if against_noise else "capacity C (nats)")
    for ax in axes.flat[len(metrics):]:
        ax.remove()
    legend: dict[str, Any] = {}  # every entry once, from whichever panel has it
    for ax in axes.flat[:len(metrics)]:
        legend.update((label, handle) for handle, label in zip(*ax.get_legend_handles_labels(),
                                                               strict=True) if label not in legend)
    fig.suptitle(title)
    fig.tight_layout()
    fig.legend(legend.values(), legend.keys(), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(len(legend), 4))
    return fig


def figure(args: argparse.Namespace) -> None:
    """Figure 1: each measure against the capacity C (eqs. 5, 6; cifar_ssl.py runs: against
    sigma), mean ± 99% Student t interval over seeds, the sigma = 0 and untrained baselines, the
    null band of a mean of as many N(0, I) samples; flags MI estimates above C + 3 SE; writes
    PREFIX.png, .pdf, .md, .csv (mnist_gauss.py runs: also PREFIX_certificate.md, .csv)."""
    runs, prefix = load_runs(args.runs), args.out
    ssl, settings, (shared, training) = (runs[0]["family"] == "ssl", runs[0]["settings"],
                                         SETTINGS[runs[0]["family"]])
    (family, symbol, equation), metrics = FAMILIES[runs[0]["family"]], PANELS[runs[0]["family"]]
    check_group(runs, shared, "runs of one figure")
    kept_runs, notes = healthy(runs)
    trained = [run for run in kept_runs if run["kind"] == "trained"]
    if not trained:
        raise Refused(f"none of the {len(runs)} runs in {' '.join(args.runs)} is a trained run "
                      "with finite capacity C that did not diverge")
    check_group(trained, training, "the trained runs of one figure")
    groups: dict[tuple[int, float], list[Run]] = {}
    for run in runs:  # a row per noise level of the trained runs, then per baseline
        groups.setdefault((KINDS.index(run["kind"]), run["noise"]), []).append(run)
    for (_, noise), members in groups.items():
        kind = members[0]["kind"]
        check_group(members, training if kind != "trained" else (), f"the {kind} baseline runs",
                    f"{members[0]['noise_key']} = {noise:g} ({kind})")
    rows = [table_row(members[0]["kind"], noise, members[0]["capacity"],
                      [run["values"] for run in kept], len(members) - len(kept))
            for (_, noise), members in sorted(groups.items())
            if (kept := healthy(members)[0])]  # a group whose runs all diverged: only its note
    first = trained[0]["settings"]
    model = (f"{first['method']} {first['arch']}, projector output" if ssl
             else f"{first['critic']} critic,")
    about = (f"{family} DM, {model} d = {settings['dim']}, {settings['data.dataset']}, "
             f"{first['steps']} steps, "
             f"normality tests on {settings['normality.subsample']}-point subsamples")
    titles = {name: title for name, _, title in metrics}
    # the runs share n, d and subsample size: a row of k seeds gets the band of a mean of k draws
    bands = {k: null_bands(runs, k) for k in sorted({row["seeds"] for row in rows})}
    band_rows = [[f"null band, mean of {k}", "", "", "", *(
        "{} to {}".format(*map(fmt, band[name])) if name in band else "" for name in titles)]
        for k, band in bands.items()]
    null = (f"null band: the central {100 * common.BAND_SHARE:g}% of the same statistic's mean "
            "over k N(0, I) samples of the same n and d (k = a row's seeds; null draws resampled, "
            "common.null_band)")
    check = ("MI check: none (cifar_ssl.py runs record no MI estimate)" if ssl
             else mi_check(trained, {"held-out I": lambda run: (run["values"]["mi_heldout"],
                                                                run["mi_se"])}, equation))
    text = (f"Figure 1 ({about}): mean ± half-width of the 99% Student t interval over seeds "
            f"(t_0.995 with seeds - 1 degrees of freedom, none for one seed); C from {equation}"
            "\n\n" + md_table(["runs", symbol, "C", "seeds", *titles.values()],
                               [row_cells(row, list(titles)) for row in rows] + band_rows)
            + f"\n\n{null}\n\n{check}{notes}\n")
    save(prefix, {"md": text, "csv": csv_text(rows, runs[0]["noise_key"])})
    certificate_md, certificate_csv = certificate(kept_runs)
    if certificate_md:
        save(f"{prefix}_certificate", {"md": certificate_md, "csv": certificate_csv})
        text += f"\n{certificate_md}\nsaved {prefix}_certificate.md, {prefix}_certificate.csv\n"
    k = min(row["seeds"] for row in rows if row["kind"] == "trained")
    fig = plot_figure1(rows, metrics, symbol, f"Figure 1: {about}", bands[k], ssl, k)
    save(prefix, {"png": fig, "pdf": fig})
    print(text + f"\nsaved {prefix}.png, {prefix}.pdf, {prefix}.md, {prefix}.csv")


# The panels of a curve: entries of its points, and the held-out MI over C (eq. 5 or 6)
CURVE = [("sliced_w2", "sliced W2 to N(0, I), test"), ("sliced_w2_train", "sliced W2, train"),
         ("knn_acc", "k-NN accuracy"), ("mi_over_c", "held-out MI / C")]
POINT = ("sliced_w2", "sliced_w2_train", "knn_acc", "mi_heldout")  # what a curve point must hold


def slope_cell(steps: list[int], values: np.ndarray) -> str:
    """The change per doubling of steps within runs: each seed's (a row of `values`) least-squares
    slope on log2(step), their mean ± 95% t half-width, the one-sample t test's p of no trend."""
    if not np.isfinite(values).all():
        return "–"
    slopes = np.polyfit(np.log2(steps), values.T, 1)[0]
    if len(slopes) < 2:
        return f"{slopes[0]:.4f}"
    with warnings.catch_warnings():  # equal slopes: p is nan
        warnings.simplefilter("ignore", RuntimeWarning)
        test = scipy.stats.ttest_1samp(slopes, 0.0)
    low, high = test.confidence_interval(0.95)
    return f"{slopes.mean():.4f} ± {(high - low) / 2:.4f} (p {fmt(float(test.pvalue))})"


def curve(args: argparse.Namespace) -> None:
    """Sliced W2 (test and train), k-NN and MI / C against training steps of mnist_gauss.py or
    mnist_uniform.py runs written with --eval-at: the seeds (thin) and their mean (thick) per
    noise level, null bands of a mean of as many N(0, I) samples, and the change per doubling of
    steps within the runs from step --since on; diverged runs left out; writes PREFIX.png, .pdf,
    .md."""
    runs, notes = healthy(load_runs(args.runs))
    if not runs:
        raise Refused(f"every run of {' '.join(args.runs)} diverged: no curve")
    prefix = args.out
    family, setting, symbol = runs[0]["family"], runs[0]["settings"], FAMILIES[runs[0]["family"]][1]
    check_group(runs, SETTINGS[family][0] + ("critic", "loss", "batch_size"), "runs of a curve")
    groups: dict[float, list[Run]] = {}
    for run in runs:  # cifar_ssl.py runs lack the entry curve
        if not entry(run, "curve", list):
            raise Refused(f"{run['file']} holds no curve: run the script with --eval-at STEP ...")
        run["curve"] = {entry(run, f"curve.{i}.step", int): {
            name: entry(run, f"curve.{i}.{name}") for name in POINT}
            for i in range(len(run["saved"]["curve"]))}
        groups.setdefault(run["noise"], []).append(run)
    n_train, n_test = (entry(runs[0], f"data.{n}", int) for n in ("n_train", "n_test"))
    rng = np.random.default_rng(0)
    train_draws = [common.sliced_w2(rng.standard_normal((n_train, setting["dim"])))
                   for _ in range(common.NULL_DRAWS)]
    # the runs share n and d: a noise level of k seeds gets the band of a mean of k draws
    bands = {k: {"sliced_w2": null_bands(runs, k)["sliced_w2"],
                 "sliced_w2_train": common.null_band(train_draws, k)}
             for k in sorted({len(members) for members in groups.values()})}
    fig = Figure(figsize=(4.2 * len(CURVE), 3.6))
    axes, rows, slopes = fig.subplots(1, len(CURVE)), [], []
    for i, (noise, members) in enumerate(sorted(groups.items())):
        steps = sorted(set.intersection(*(set(run["curve"]) for run in members)))
        if not steps:
            raise Refused(f"the runs of noise {noise:g} share no step of their curves")
        values = {name: np.array([[run["curve"][t][name] for t in steps] for run in members])
                  for name in POINT}
        capacity = members[0]["capacity"]  # sigma = 0: C = inf, no MI / C
        values["mi_over_c"] = values["mi_heldout"] / (capacity if capacity < math.inf else np.nan)
        for ax, (name, title) in zip(axes, CURVE, strict=True):
            ax.plot(steps, values[name].T, color=f"C{i}", linewidth=0.6, alpha=0.5)
            ax.plot(steps, values[name].mean(0), "o-", color=f"C{i}",
                    label=f"{symbol} = {noise:g}" + (" (no noise)" if noise == 0 else ""))
            ax.set(xscale="log", yscale="log" if name.startswith("sliced") else "linear",
                   xlabel="training steps", title=title)
        rows += [[f"{noise:g}", str(t), str(len(members)), *(
            "(C = inf)" if name == "mi_over_c" and capacity == math.inf
            else mean_cell(mean_ci99(values[name][:, j])) for name, _ in CURVE)]
            for j, t in enumerate(steps)]
        late = [j for j, t in enumerate(steps) if t >= args.since]
        if len(late) > 1:
            slopes.append([f"{noise:g}", f"{steps[late[0]]} to {steps[late[-1]]}",
                           str(len(members)), *(slope_cell([steps[j] for j in late],
                                                           values[name][:, late])
                                                for name, _ in CURVE)])
    for k, band in bands.items():
        for ax, name in zip(axes, ("sliced_w2", "sliced_w2_train")):
            ax.axhspan(*band[name], color="0.5", alpha=0.3,
                       label=f"null band (mean of {k})" if ax is axes[0] else None)
    axes[0].legend(fontsize=8)
    about = (f"{setting['critic']} critic, d = {setting['dim']}, {setting['data.dataset']}, "
             f"batch {setting['batch_size']}")
    fig.suptitle(f"Matching against training steps ({about})")
    fig.tight_layout()
    band_text = "; ".join(f"mean of {k}: test {' to '.join(map(fmt, b['sliced_w2']))}, train "
                          f"{' to '.join(map(fmt, b['sliced_w2_train']))}"
                          for k, b in sorted(bands.items()))
    text = (f"Matching against training steps ({about}): mean ± half-width of the 99% Student t "
            "interval over seeds\n\n" + md_table([symbol, "step", "seeds",
                                                  *(t for _, t in CURVE)], rows)
            + f"\n\nsliced W2 null band (central {100 * common.BAND_SHARE:g}% of the mean of k "
            f"N(0, I) samples; test n = {n_test}, train n = {n_train}): {band_text}\n"
            + ("\nChange per doubling of training steps, within the runs: each seed's "
               "least-squares slope on log2(step), mean ± half-width of the 95% t interval over "
               "seeds, (p of the one-sample t test of no trend)\n\n"
               + md_table([symbol, "steps", "seeds", *(t for _, t in CURVE)], slopes) + "\n"
               if slopes else "") + notes)
    save(prefix, {"png": fig, "pdf": fig, "md": text})
    print(text + f"\nsaved {prefix}.png, {prefix}.pdf, {prefix}.md")


def mi_check(runs: list[Run], estimates: dict[str, Any], equation: str) -> str:
    """A bug detector: a lower bound on I(f(X'); f(X) + Z) cannot exceed C (eqs. 5, 6), so an
    estimate above C + 3 SE flags a broken estimator, capacity or run."""
    checked, violations = 0, []
    for run, (label, get) in ((run, item) for run in runs for item in estimates.items()):
        mi, se = get(run)
        checked += not math.isnan(mi)
        if mi > run["capacity"] + 3 * (se if math.isfinite(se) else 0.0):
            violations.append(f"  {run['path']}: {label} = {mi:.3f} +- {se:.3f} > C = "
                              f"{run['capacity']:.3f}")
    return (f"MI check, a bug detector (every estimate <= C + 3 SE, {equation}): "
            + (f"{len(violations)} of {checked} estimates exceed the bound:\n"
               + "\n".join(violations) if violations
               else f"no estimate exceeds the bound ({checked} checked)"))


def certificate(runs: list[Run]) -> tuple[str, str]:
    """The DM certificate (.md, .csv) of mnist_gauss.py's mi_estimates: C - I_hat bounds
    KL(f(X) + Z || N(0, (1 + sigma^2) I)) plus the non-invariance term (Lemma B.1) where I_hat
    is a lower bound (InfoNCE, NWJ: eqs. 2-3), the plug-in DV is not; ("", "") without them.
    The trained critic's NWJ and DV are left out (they stay in metrics.json): a critic trained
    for InfoNCE can make them explode, by orders of magnitude below 0."""
    runs = [run for run in runs if run["kind"] == "trained" and "mi_estimates" in run["saved"]]
    if not runs:
        return "", ""
    batch, whole = (entry(runs[0], f"mi_estimates.{n}", int) for n in ("batch", "n_test"))
    columns = {"trained.infonce.batch": f"InfoNCE, B = {batch}",
               "trained.infonce.whole": f"InfoNCE, B = {whole}",
               "theorem41.infonce.whole": "InfoNCE, Thm 4.1 critic",
               "theorem41.nwj.whole": "NWJ, Thm 4.1 critic",
               "theorem41.dv.whole": "DV, Thm 4.1 critic (biased up, not a bound)",
               "gap": "C − largest lower bound"}
    bounds = [column for column in columns if ".dv." not in column and column != "gap"]

    def estimate(run: Run, column: str) -> tuple[float, float]:  # nan: a critic not trained
        if column.split(".")[0] not in entry(run, "mi_estimates", dict):
            return math.nan, math.nan
        return entry(run, f"mi_estimates.{column}.0"), entry(run, f"mi_estimates.{column}.1")
    groups: dict[float, list[dict[str, float]]] = {}
    for run in runs:
        values = {column: estimate(run, column)[0] for column in list(columns)[:-1]}
        values["gap"] = run["capacity"] - np.nanmax([values[column] for column in bounds])
        groups.setdefault(run["noise"], []).append(values)
    capacity = {run["noise"]: run["capacity"] for run in runs}
    rows = [table_row("trained", noise, capacity[noise], members)
            for noise, members in sorted(groups.items())]
    check = mi_check(runs, {columns[c]: lambda run, c=c: estimate(run, c) for c in bounds},
                     "eq. 5")
    text = (f"MI estimates (nats) by estimator, mean ± 99% t interval over seeds; InfoNCE is "
            f"capped at log {batch} = {math.log(batch):.3f} on the test batches and at log "
            f"{whole} = {math.log(whole):.3f} on one batch of {whole} test images; NWJ and DV "
            "(of the Theorem 4.1 critic only: a learned critic's can explode) are not capped. "
            "C − largest lower bound (per run, over InfoNCE and NWJ) bounds "
            "KL(f(X) + Z ‖ N(0, (1 + σ²) I)) plus the non-invariance term I(f(X) + Z; f(X) | "
            "f(X')) (Lemma B.1), nothing about f(X) alone; a lower bound short of C certifies "
            "nothing\n\n" + md_table(["runs", "σ", "C", "seeds", *columns.values()],
                                      [row_cells(row, list(columns)) for row in rows])
            + f"\n\n{check}\n")
    return text, csv_text(rows, "sigma")


def compare(args: argparse.Namespace) -> None:
    """Every measure of two groups of runs (the seeds of two settings or critics): mean ± 99%
    t interval per group, the difference of means with its 95% Welch interval, the two-sided
    p-value of Welch's t test (unequal variances; nan with fewer than two seeds a side) and the
    difference it detects with 80% power at level 0.05, (t_0.975 + t_0.80) SE at the seeds'
    spread: a "not measurable" difference is one below that, not zero. Diverged runs left out.
    --paired: runs of one seed form a pair (both groups the same seeds, e.g. two settings trained
    from the same initialization and data order), the paired t test of the per-seed differences."""
    groups, notes = zip(*(healthy(load_runs(group)) for group in (args.runs, args.against)))
    if not all(groups):
        raise Refused(f"every run of {' '.join(args.runs if not groups[0] else args.against)} "
                      "diverged: nothing to compare")
    if args.paired:
        groups = tuple(sorted(group, key=lambda run: run["seed"]) for group in groups)
        if [run["seed"] for run in groups[0]] != [run["seed"] for run in groups[1]]:
            raise Refused("--paired needs the same seeds in both groups (diverged runs are left "
                          f"out): {[r['seed'] for r in groups[0]]} against "
                          f"{[r['seed'] for r in groups[1]]}")
    for name, group in zip("AB", groups, strict=True):
        check_group(group, SETTINGS[group[0]["family"]][0], f"the runs of group {name}",
                    f"group {name}")
    rows = []
    for name, _, title in [panel for panel in PANELS[groups[0][0]["family"]]  # shared measures
                           if all(panel[0] in run["values"] for run in groups[1])]:
        a, b = ([run["values"][name] for run in group] for group in groups)
        diff, p, low, high, detect = float(np.mean(a) - np.mean(b)), *[math.nan] * 4
        with warnings.catch_warnings():  # values like 1e-254 warn of lost precision, not an error
            warnings.simplefilter("ignore", RuntimeWarning)
            if min(map(len, (a, b))) > 1:
                test = (scipy.stats.ttest_rel(a, b) if args.paired
                        else scipy.stats.ttest_ind(a, b, equal_var=False))
                p, (low, high) = test.pvalue, test.confidence_interval(0.95)
                t, t80 = (scipy.stats.t.ppf(q, test.df) for q in (0.975, 0.8))
                detect = (t + t80) * (high - low) / (2 * t)  # (t_0.975 + t_0.80) SE
        rows.append([title, mean_cell(mean_ci99(a)), mean_cell(mean_ci99(b)), fmt(diff),
                     f"{fmt(low)} to {fmt(high)}", fmt(float(p)), fmt(detect)])
    test = "paired t test of A − B, pairs by seed" if args.paired else "Welch's t test of A − B"
    print(f"A: {len(groups[0])} runs, B: {len(groups[1])} runs; mean ± 99% t interval, {test} "
          "(two-sided)\n\n"
          + md_table(["measure", "A", "B", "A − B", "95% interval", "paired p" if args.paired
                      else "Welch p",
                      "detectable (80% power)"], rows) + "".join(notes))


# --- factor: what keeps the embeddings from N(0, I) ------------------------------------------
FACTORS = ("aug_sigma", "critic", "batch_size")  # the mnist_gauss.py settings a study varies
STUDY = [("sliced_w2", "normality.sliced_w2", "sliced W2 to N(0, I)"),
         ("henze_zirkler_p", "normality.henze_zirkler_p", "Henze-Zirkler p (average)"),
         ("whole_p", "normality.decision.p", "whole-sample test p"),
         ("dm_gap", "dm_gap", "C − Î (held-out lower bound)"),
         ("non_invariance", "non_invariance", "non-invariance E (f(X') − f(X))²"),
         ("non_invariance_nats", "non_invariance_nats", "its term in C − I, at most (nats)"),
         ("smoothed_kl", None, "KL(f(X) + Z ‖ N(0, (1 + σ²) I)) estimate"),
         ("knn_acc", "downstream.knn_acc", "k-NN accuracy")]


def smoothed_kl(z: np.ndarray, sigma: float, seed: int = 0) -> float:
    """KL(f(X) + Z || N(0, (1 + sigma^2) I)), the distribution-matching term of C - I (Lemma B.1),
    from embeddings z (n, d) and sigma > 0: the cross-entropy of y = f(X) + Z to that Gaussian less
    h(y), estimated as -mean log p(y_i) over a seeded half of z, each y_i = z_i + Z_i, p the mixture
    of N(z_j, sigma^2 I) over the other half. p is unbiased, log p biased low: the estimate falls
    below the KL and is read beside the same estimate on N(0, I) samples of the same n, d."""
    rng = np.random.default_rng(seed)
    z, d, half = rng.permutation(np.asarray(z, dtype=np.float64)), z.shape[1], len(z) // 2
    centres, y = z[:half], z[half:] + sigma * rng.standard_normal(z[half:].shape)
    log_p = np.concatenate([scipy.special.logsumexp(-((chunk ** 2).sum(1)[:, None] + (
        centres ** 2).sum(1) - 2 * chunk @ centres.T) / (2 * sigma ** 2), axis=1)
        for chunk in np.array_split(y, math.ceil(len(y) / 1000))])
    log_p -= math.log(len(centres)) + d / 2 * math.log(2 * math.pi * sigma ** 2)
    cross = (d * math.log(2 * math.pi * (1 + sigma ** 2))
             + (y ** 2).sum(1).mean() / (1 + sigma ** 2)) / 2
    return float(cross + log_p.mean())


def factor(args: argparse.Namespace) -> None:
    """Each measure against one setting of mnist_gauss.py runs (--by aug_sigma, critic or
    batch_size) that share every other: a row per (sigma, steps, value), mean ± 99% t interval
    over seeds, diverged runs counted apart; sliced W2 beside the null band of a mean of as many
    N(0, I) samples; the non-invariance E (f(X') - f(X))^2 per coordinate (Var f_i = 1), and
    C - I_hat >= C - I = KL(f(X) + Z || N(0, (1 + sigma^2) I)) + I(f(X) + Z; f(X) | f(X'))
    (Lemma B.1) drawn with the runs' upper bound on its second, non-invariance term; writes
    PREFIX.png, .pdf, .md."""
    runs = load_runs(args.runs)
    if runs[0]["family"] != "sigma":
        raise Refused(f"{runs[0]['path']} is not a mnist_gauss.py run")
    check_group(runs, SETTINGS["sigma"][0] + ("loss",), "runs of one factor study")
    groups: dict[tuple[float, int, Any], list[Run]] = {}
    shapes: dict[float, tuple[int, ...]] = {}  # per sigma, the (n, d) of its runs' z_test
    for run in runs:
        run["factor"] = {key: entry(run, key, (int, float, str)) for key in FACTORS}
        if differ := [k for k in FACTORS
                      if k != args.by and run["factor"][k] != runs[0]["factor"][k]]:
            raise Refused(f"{runs[0]['path']} and {run['path']} differ in {differ[0]}: a study of "
                          f"--by {args.by} keeps it fixed")
        run["values"].update({name: entry(run, key) for name, key, _ in STUDY if key})
        file = run["path"] / "embeddings.npz"  # the KL estimate needs sigma > 0 and z_test
        z = read_arrays(file).get("z_test") if run["noise"] > 0 and file.is_file() else None
        if z is not None:
            shapes.setdefault(run["noise"], check_embeddings(z, f"{file}:z_test").shape)
        run["values"]["smoothed_kl"] = math.nan if z is None else smoothed_kl(z, run["noise"])
        groups.setdefault((run["noise"], entry(run, "steps", int), run["factor"][args.by]),
                          []).append(run)
    rows, lines = [], {}
    for (noise, steps, value), members in sorted(groups.items()):
        check_group(members, (), "", f"σ = {noise:g}, {steps} steps, {args.by} = {value}")
        if kept := healthy(members)[0]:
            rows.append({**table_row(f"{steps} steps", noise, members[0]["capacity"],
                                     [{n: r["values"][n] for n, _, _ in STUDY} for r in kept],
                                     len(members) - len(kept)), "value": value})
            lines.setdefault((noise, steps), []).append(rows[-1])
    if not rows:
        raise Refused(f"every run of {' '.join(args.runs)} diverged: no study")
    bands = {k: null_bands(runs, k)["sliced_w2"] for k in sorted({row["seeds"] for row in rows})}
    draws = {noise: [smoothed_kl(np.random.default_rng(i).standard_normal(shape), noise, i)
                     for i in range(common.NULL_DRAWS)]  # the KL estimate on N(0, I) samples
             for noise, shape in shapes.items()}
    kl_bands = {(row["noise"], row["seeds"]): common.null_band(draws[row["noise"]], row["seeds"])
                for row in rows if row["noise"] in draws}
    fig = Figure(figsize=(4.2 * 4, 3.6))
    values = sorted({row["value"] for row in rows})
    for ax, name in zip(fig.subplots(1, 4), ("sliced_w2", "knn_acc", "non_invariance", "dm_gap")):
        for i, ((noise, steps), members) in enumerate(sorted(lines.items())):
            ax.errorbar([values.index(row["value"]) for row in members],
                        [row[name][0] for row in members], capsize=3, fmt="o-", color=f"C{i}",
                        yerr=np.nan_to_num([row[name][1] for row in members]),
                        label=f"σ = {noise:g}, {steps} steps")
            for part, style in (("non_invariance_nats", "s--"), ("smoothed_kl", "^:")) * (
                    name == "dm_gap"):  # the two terms of C - I: the first at most, the KL
                ax.errorbar([values.index(row["value"]) for row in members],
                            [row[part][0] for row in members], capsize=3, fmt=style,
                            color=f"C{i}", mfc="none",
                            yerr=np.nan_to_num([row[part][1] for row in members]))
        if name == "sliced_w2":
            ax.axhspan(*bands[min(bands)], color="0.5", alpha=0.3,
                       label=f"null band (mean of {min(bands)})")
            ax.legend(fontsize=8)
        ax.set(xticks=range(len(values)), xticklabels=[f"{v:g}" if not isinstance(v, str) else v
                                                       for v in values],
               xlabel=args.by, title=dict((n, t) for n, _, t in STUDY)[name]
               + "\n(dashed: non-invariance term, at most; dotted: KL)" * (name == "dm_gap"))
    fig.tight_layout()
    fixed = ", ".join(f"{key} {runs[0]['factor'][key]}" for key in FACTORS if key != args.by)
    text = (f"Factor study, --by {args.by} ({fixed}, d = {runs[0]['settings']['dim']}, "
            f"{runs[0]['settings']['data.dataset']}): mean ± 99% t interval over seeds\n\n"
            + md_table(["steps", "σ", "C", "seeds", args.by, *(t for _, _, t in STUDY)],
                       [(cells := row_cells(row, [n for n, _, _ in STUDY]))[:4]
                        + [str(row["value"])] + cells[4:] for row in rows])
            + "\n\nsliced W2 null band (central 95% of the mean of k N(0, I) samples): "
            + "; ".join(f"k = {k}: {' to '.join(map(fmt, b))}" for k, b in bands.items())
            + "\n\nKL estimate on N(0, I) samples of the same n, d (it is biased low; central 95% "
            "of the mean of k): " + "; ".join(f"σ = {noise:g}, k = {k}: {' to '.join(map(fmt, b))}"
                                             for (noise, k), b in kl_bands.items())
            + healthy(runs)[1] + "\n")
    save(args.out, {"png": fig, "pdf": fig, "md": text})
    print(text + f"\nsaved {args.out}.png, {args.out}.pdf, {args.out}.md")


# --- table: Table 1 (and poster Table 2) from cifar_ssl.py runs -----------------------------
def probe_table(runs: list[Run], key_of: Any, label_of: Any, column_of: Any, columns: dict,
                paper: dict, std: bool) -> str:
    """Linear-probe top-1 / top-5 per column_of(run) beside `paper[row]`: a row per key_of(run)
    or paper key, one for random-init encoders; a cell's runs are seeds of one setting."""
    def probe_cell(values: list[float], paper: float | tuple | None) -> str:
        ours = "–" if not values else mean_cell(  # ± 99% t half-width, or std (ddof 1)
            (np.mean(values), np.std(values, ddof=1) if len(values) > 1 else math.nan) if std
            else mean_ci99(values), lambda x: f"{100 * x:.2f}")
        if isinstance(paper, tuple):
            return ours + f" ({paper[0]:.2f} ± {paper[1]:.2f})"
        return ours + ("" if paper is None else f" ({paper:.2f})")

    def row_of(run: Run) -> Any:
        return "untrained" if run["kind"] == "untrained" else key_of(run)
    keys = sorted(set(paper) | {key_of(run) for run in runs if run["kind"] != "untrained"})
    rows = [(key, label_of(key)) for key in keys] + [("untrained", "random-init encoder")] * any(
        run["kind"] == "untrained" for run in runs)
    cells: dict[tuple[Any, Any], list[Run]] = {}
    for run in runs:
        cells.setdefault((row_of(run), column_of(run)), []).append(run)
    for (row, column), members in cells.items():
        what = f"the runs of {dict(rows).get(row, row)} on {columns[column]}"
        check_group(members, ("arch", "steps", "batch_size", "probe_images.train",
                              "probe_images.test"), what, what)
    lines = [[label, *(probe_cell([run["values"][key] for run in cells.get((row, col), [])],
                                  paper[row][2 * c + k] if row in paper and 2 * c + k < len(
                                      paper[row]) else None)
                       for c, col in enumerate(columns) for k, key in enumerate(("top1", "top5")))]
             for row, label in rows]
    header = ["σ" if std else "",
              *(f"{name} top-{k}" for name in columns.values() for k in (1, 5))]
    settings = sorted({(columns[column_of(r)], r["settings"]["arch"],
                        round(entry(r, "epochs"), 2), r["settings"]["batch_size"],
                        r["settings"]["probe_images.train"]) for r in runs})
    return (md_table(header, lines) + f"\n\nour runs ({len(runs)}): " + "; ".join(
        f"{d}: {arch}, {epochs:g} epochs, batch {batch}, probe on {n} images"
        for d, arch, epochs, batch, n in settings) + "\n")


def table(args: argparse.Namespace) -> None:
    """Table 1 (linear-probe top-1 / top-5 of cifar_ssl.py runs beside the paper's, a column pair
    per data set) and poster Table 2 (VICReg on ImageFolder trees of 100 or 1000 classes at 128
    px or more, mean ± std over seeds); writes PREFIX.md."""
    runs, prefix = load_runs(args.runs), args.out
    if runs[0]["family"] != "ssl":
        raise Refused(f"{runs[0]['path']} is not a cifar_ssl.py run (no method in metrics.json)")
    imagenet = [run for run in runs if entry(run, "dataset", str) == "folder"
                and entry(run, "method", str) == "vicreg"
                and entry(run, "data.n_classes", int) in TABLE2_DATASETS
                and entry(run, "data.image_size", int) >= 128]
    others, parts = [run for run in runs if all(run is not r for r in imagenet)], []

    def label(key: tuple[str, float, bool]) -> str:  # the paper's sigma = 0 row is --head none
        method, sigma, with_head = key
        return METHOD_NAMES.get(method, method) + (f" σ = {sigma:g}" if sigma else "") + (
            ", BatchNorm head, no noise" if with_head and not sigma else "")
    if others or not imagenet:
        datasets = {**TABLE_DATASETS, **{d: d for d in sorted(
            {entry(run, "dataset", str) for run in others} - set(TABLE_DATASETS))}}
        parts.append("Table 1: linear-probe accuracy (%) on the test split, ours (paper's in "
                     "parentheses: ResNet-18, 800 epochs, batch 256)\n\n" + probe_table(
                         others, lambda r: (entry(r, "method", str), r["noise"],
                                            entry(r, "head", str) == "bn"),
                         label, lambda r: entry(r, "dataset", str), datasets,
                         {(*key, key[1] != 0): v for key, v in PAPER_TABLE1.items()}, std=False))
    if imagenet:
        parts.append("Table 2 (poster): VICReg linear-probe accuracy (%) on the validation "
                     "split, ours (poster's in parentheses: ResNet-50, 100 epochs; mean ± std "
                     "over seeds)\n\n" + probe_table(
                         imagenet, lambda r: r["noise"], "{:g}".format,
                         lambda r: entry(r, "data.n_classes", int), TABLE2_DATASETS,
                         PAPER_TABLE2, std=True))
    text = "\n".join(parts)
    save(prefix, {"md": text})
    print(text + f"\nsaved {prefix}.md")


# --- embeddings: the report on saved embeddings (a run's or another model's) ------------------
def check_embeddings(z: np.ndarray, what: str) -> np.ndarray:
    """z as an (n, d) float64 array, refused where the tests cannot use it (not real, NaN / inf,
    too few rows, a constant column or one whose moments under- or overflow in float64)."""
    if z.dtype.kind not in "biuf":
        raise Refused(f"{what} holds {z.dtype} values: embeddings must be real numbers")
    z = np.asarray(z, dtype=np.float64)
    z = z[:, None] if z.ndim == 1 else z
    if z.ndim != 2 or 0 in z.shape:
        raise Refused(f"{what}: expected an (n, d) array of embeddings, got shape {z.shape}")
    if not np.isfinite(z).all():
        raise Refused(f"{what} holds {int((~np.isfinite(z)).sum())} NaN or infinite values")
    if len(z) < MIN_POINTS:
        raise Refused(f"{what} holds {len(z)} points: the tests need at least {MIN_POINTS}")
    peak = np.abs(z).max(axis=0)  # the sd of z / peak cannot under- or overflow
    sd = (z / np.where(peak > 0, peak, 1)).std(axis=0) * peak
    for j, s in enumerate(sd):
        if not 1e-50 <= s <= 1e50:  # 0 for a constant column
            raise Refused(f"{what}: column {j} has standard deviation {s:.1e}, outside [1e-50, "
                          "1e50] where the tests' moments under- or overflow in double precision "
                          "(a constant column: drop it; otherwise rescale it)")
    return z


def check_labels(y: np.ndarray, n: int, what: str) -> np.ndarray:
    """n class labels (integers, whole numbers saved as floats, or names), two classes or more."""
    y = np.asarray(y).reshape(-1) if np.ndim(y) == 2 and 1 in np.shape(y) else np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise Refused(f"{what} has shape {y.shape}: expected {n} labels, one per embedding")
    if y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all():
        y = y.astype(np.int64)
    if y.dtype.kind not in "biuUS":
        raise Refused(f"{what} holds {y.dtype} values that are not class labels (integers or "
                      "names)")
    if len(np.unique(y)) < 2:
        raise Refused(f"{what} holds a single class: the downstream scores need two")
    return y


def read_arrays(file: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npy ("" for its one array) or .npz file (numpy.save / numpy.savez)."""
    try:
        loaded = np.load(file, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return {"": loaded}
        with loaded:
            return dict(loaded)
    except (ValueError, EOFError, zipfile.BadZipFile) as err:  # OSError: main names the file
        raise Refused(f"{file} is not a readable {file.suffix} file ({err})") from None


def pick_arrays(arrays: dict[str, np.ndarray], file: Path, key: str | None) -> tuple:
    """(embeddings, (z_train, y_train, z_test, y_test) or None, their name): the array `key`,
    else a run's z_test (labelled with z_train, y_train, y_test), else the one 2-D array."""
    found = ", ".join(f"{name or 'the array'} {a.shape}" for name, a in arrays.items())
    if key is not None and key not in arrays:
        raise Refused(f"{file} holds no array {key!r}; it holds: {found}")
    names = ([key] if key is not None else ["z_test"] if "z_test" in arrays
             else [k for k, a in arrays.items() if a.ndim == 2] or list(arrays))
    if len(names) != 1:
        raise Refused(f"{file}: cannot tell which array holds the embeddings (found {found}); "
                      "name it with --key NAME")
    z = check_embeddings(arrays[names[0]], f"{file} ({names[0] or 'the array'})")
    if names != ["z_test"] or not {"z_train", "y_train", "y_test"} <= arrays.keys():
        return z, None, names[0] or "the array"
    z_tr = check_embeddings(arrays["z_train"], f"{file} (z_train)")
    if z_tr.shape[1] != z.shape[1]:
        raise Refused(f"{file}: z_train has {z_tr.shape[1]} columns, z_test {z.shape[1]}")
    return z, (z_tr, check_labels(arrays["y_train"], len(z_tr), f"{file} (y_train)"), z,
               check_labels(arrays["y_test"], len(z), f"{file} (y_test)")), "z_test"


def embeddings(args: argparse.Namespace) -> None:
    """The Section 5 report on a run's embeddings.npz or any .npy / .npz (one row per sample):
    averaged p-values and sliced W2 beside their null bands, a test at 5%; downstream scores
    where the file holds z_train, y_train, z_test, y_test as a run's does; --uniform (Section
    3.2): U[0, 1] tests, normality after Phi^-1; --out PREFIX writes PREFIX.json, never over a
    file."""
    file, prefix = Path(args.file), args.out and args.out.removesuffix(".json")
    if prefix and Path(f"{prefix}.json").exists():
        raise Refused(f"{prefix}.json exists: name a new file with --out")
    z, labelled, source = pick_arrays(read_arrays(file), file, args.key)
    if args.uniform and (z.min() < 0 or z.max() > 1):
        raise Refused(f"{file}: --uniform needs embeddings in [0, 1], found [{z.min():.3g}, "
                      f"{z.max():.3g}]")
    report: dict[str, Any] = {"file": str(file), "arrays": source, "n": len(z),
                              "dim": z.shape[1], "uniform": args.uniform}
    lines = [f"{file} ({source}): n = {len(z)}, d = {z.shape[1]}"
             + (", tested after the PIT Phi^-1 (--uniform)" if args.uniform else "")]
    if args.uniform:
        u = report["uniformity"] = common.uniformity_report(z)
        lines.append(f"uniformity: Kolmogorov-Smirnov p (mean over coordinates) "
                     f"{u['ks_p_mean']:.3f}, largest D {u['ks_stat_max']:.3f}")
    report["normality"] = common.normality_report(common.to_gaussian(z) if args.uniform else z,
                                                  seed=args.seed, subsample=args.subsample)
    if not np.isfinite([v for v in report["normality"].values() if isinstance(v, float)]).all():
        raise Refused(f"{file}: the normality tests returned NaN on these embeddings")
    lines += common.normality_lines(report["normality"])
    if labelled:
        d = report["downstream"] = common.downstream_report(*labelled, seed=args.seed)
        lines.append(f"downstream: k-NN {d['knn_acc']:.4f}   GaussianNB {d['gnb_acc']:.4f}   "
                     f"MLP {d['mlp_acc']:.4f}   silhouette {d['silhouette']:.3f}")
    print("\n".join(lines))
    if prefix:
        save(prefix, {"json": json.dumps(report, indent=2) + "\n"})
        print(f"saved {prefix}.json")


# --- outliers: from the known prior against the fitted detector ------------------------------
def squared_norm(z: np.ndarray, uniform: bool = False) -> np.ndarray:
    """||g||^2 per row, g = z (Gaussian DM) or Phi^-1(z) (uniform DM, z in [0, 1]^d): chi^2_d
    distributed when g ~ N(0, I_d) (Theorems 3.4, 3.5), the prior rule's score."""
    g = common.to_gaussian(z) if uniform else np.asarray(z, dtype=np.float64)
    return (g * g).sum(axis=1)


def prior_pvalues(z: np.ndarray, uniform: bool = False) -> np.ndarray:
    """P(chi^2_d >= ||g||^2) per row: its false-alarm rate at level alpha is exactly alpha when
    the embeddings match the prior, with nothing fitted."""
    return scipy.stats.chi2.sf(squared_norm(z, uniform), df=np.shape(z)[1])


def mahalanobis_scores(z_fit: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of each row of z to the mean and covariance of z_fit."""
    z_fit, z = np.asarray(z_fit, dtype=np.float64), np.asarray(z, dtype=np.float64)
    centred = z - z_fit.mean(axis=0)
    precision = np.linalg.pinv(np.atleast_2d(np.cov(z_fit, rowvar=False)))
    return np.einsum("ij,jk,ik->i", centred, precision, centred)


def auroc(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
    """AUROC of `score > threshold` separating out from in (Mann-Whitney U / (n_in n_out))."""
    ranks = scipy.stats.rankdata(np.concatenate([scores_in, scores_out]))
    n_in, n_out = len(scores_in), len(scores_out)
    return float((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out))


def binomial_interval(k: int, n: int, level: float = 0.99) -> tuple[float, float]:
    """Clopper-Pearson (exact) confidence interval of a rate k / n."""
    ci = scipy.stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=level)
    return float(ci.low), float(ci.high)


def outlier_report(z_train: np.ndarray, z_test: np.ndarray, z_shifted: dict[str, np.ndarray],
                   alphas: tuple[float, ...] = (0.01, 0.05, 0.10), uniform: bool = False) -> dict:
    """The prior rule (p < alpha) against the fitted one (Mahalanobis above its 1 - alpha quantile
    on z_train): false alarms (99% interval), detection rates, AUROC of ||g||^2 / the distance."""
    sets = {"test": z_test, **z_shifted}
    pvalues = {name: prior_pvalues(z, uniform) for name, z in sets.items()}
    fitted = {name: mahalanobis_scores(z_train, z) for name, z in sets.items()}
    norms = {name: squared_norm(z, uniform) for name, z in sets.items()}
    train = mahalanobis_scores(z_train, z_train)
    report: dict[str, Any] = {"n_test": len(z_test), "alphas": {}, "auroc": {
        name: {"prior": auroc(norms["test"], norms[name]),
               "fitted": auroc(fitted["test"], fitted[name])} for name in z_shifted}}
    for alpha in alphas:
        threshold = np.quantile(train, 1 - alpha)
        flags = {"prior": {name: p < alpha for name, p in pvalues.items()},
                 "fitted": {name: d > threshold for name, d in fitted.items()}}
        report["alphas"][f"{alpha:g}"] = {rule: {
            "false_alarm": int(flagged["test"].sum()) / len(z_test),
            "false_alarm_ci99": binomial_interval(int(flagged["test"].sum()), len(z_test)),
            **{f"detect_{name}": float(flagged[name].mean()) for name in z_shifted}}
            for rule, flagged in flags.items()}
    return report


def outliers(args: argparse.Namespace) -> None:
    """Outliers in runs written with --ood: false-alarm and detection rates and AUROC of the
    prior rule (chi^2_d p-value of ||z||^2, Theorem 3.4) against the fitted Mahalanobis rule, a
    row per noise level, mean ± 99% t interval over seeds, diverged runs left out; --out PREFIX
    writes .md, .csv, .json."""
    (runs, notes), groups = healthy(load_runs(args.runs)), {}
    if not runs:
        raise Refused(f"every run of {' '.join(args.runs)} diverged: no outlier table")
    for run in runs:
        file = run["path"] / "embeddings.npz"
        z = {key: check_embeddings(a, f"{file}:{key}") for key, a in read_arrays(file).items()
             if key in ("z_train", "z_test") or key.startswith("z_ood_")}
        if not {"z_train", "z_test"} <= z.keys() or len(z) < 3:
            raise Refused(f"{file} holds no z_train, z_test and z_ood_<name>: run the script with "
                          "--ood fashion-mnist inverted noise")
        groups.setdefault((run["kind"], run["noise"], run["capacity"]), []).append(outlier_report(
            z.pop("z_train"), z.pop("z_test"), {k.removeprefix("z_ood_"): a for k, a in z.items()},
            uniform=runs[0]["family"] == "eps"))
    alphas, rules = list(next(iter(groups.values()))[0]["alphas"]), ("prior", "fitted")
    shifts = list(dict.fromkeys(name for group in groups.values() for name in group[0]["auroc"]))
    alarms = [f"false_alarm_{rule}_{a}" for rule in rules for a in alphas]

    def measures(r: dict[str, Any]) -> dict[str, float]:  # nan where a run lacks a shifted set
        return {**{f"false_alarm_{rule}_{a}": r["alphas"][a][rule]["false_alarm"]
                   for rule in rules for a in alphas},
                **{f"{what}_{rule}_{name}": r["auroc"].get(name, {}).get(rule, math.nan)
                   if what == "auroc" else r["alphas"]["0.05"][rule].get(f"detect_{name}", math.nan)
                   for name in shifts for what in ("detect_at_0.05", "auroc") for rule in rules}}
    rows = [table_row(kind, noise, capacity, list(map(measures, reports)))
            for (kind, noise, capacity), reports in sorted(
                groups.items(), key=lambda item: (KINDS.index(item[0][0]), item[0][1]))]
    head, three = ["runs", "noise", "C", "seeds"], "{:.3f}".format
    text = ("Outliers from the prior: false-alarm rate on the held-out test embeddings (nominal "
            "= alpha), mean ± 99% t interval over seeds\n\n"
            + md_table(head + [f"{rule} α={a}" for rule in rules for a in alphas],
                       [row_cells(row, alarms, three) for row in rows])
            + "\n\nDetection rate at α = 0.05 and AUROC on each shifted set\n\n"
            + md_table(head + ["shift", "prior detect", "fitted detect", "prior AUROC",
                               "fitted AUROC"],
                       [row_cells(row, [], three) + [name] + [
                           mean_cell(row[f"{what}_{rule}_{name}"], three)
                           for what in ("detect_at_0.05", "auroc") for rule in rules]
                        for row in rows for name in shifts]) + notes + "\n")
    print(text)
    if prefix := args.out:
        save(prefix, {"md": text, "csv": csv_text(rows, newline="\r\n"),
                      "json": json.dumps([{"kind": k, "noise": n, "reports": r}
                                          for (k, n, _), r in groups.items()], indent=1)})
        print(f"saved {prefix}.md, {prefix}.csv, {prefix}.json")


# --- Command line ------------------------------------------------------------------------------
def number(kind: type, low: float, high: float) -> Callable[[str], Any]:
    """argparse type: a `kind` (int or float) in [low, high] (argparse reports a ValueError)."""
    def parse(text: str) -> Any:
        if not low <= (value := kind(text)) <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse's message: "invalid int value: 'x'"
    return parse


# mode -> (function, help, default of --out: None prints only, "" has no --out)
MODES = {"figure": (figure, "Figure 1: each measure against the capacity C", "figure1"),
         "compare": (compare, "two groups of seeds: Welch's (or paired) t test per measure", ""),
         "curve": (curve, "the measures against training steps (--eval-at runs)", "curve"),
         "factor": (factor, "the measures against --aug-sigma, --critic or --batch-size",
                    "factor"),
         "table": (table, "Table 1 (and poster Table 2) from cifar_ssl.py runs", "table1"),
         "outliers": (outliers, "outliers from the prior against the fitted Mahalanobis rule",
                      None),
         "embeddings": (embeddings, "the Section 5 report on saved embeddings", None)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,  # the mode list as written
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = p.add_subparsers(dest="mode", required=True, metavar="MODE")
    parsers = {}
    for name, (function, text, out) in MODES.items():  # described by the function's docstring
        q = parsers[name] = modes.add_parser(
            name, help=text, description=inspect.cleandoc(function.__doc__),
            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if name != "embeddings":
            q.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, or "
                           "folders searched recursively for them (those holding metrics.json)")
        if out != "":
            q.add_argument("--out", metavar="PREFIX", default=out, help="the prefix of the "
                           "files written" + ("" if out else "; omitted: print only"))
    parsers["curve"].add_argument("--since", type=number(int, 0, 10 ** 9), default=0,
                                  metavar="STEP", help="the changes per doubling from this step")
    parsers["factor"].add_argument("--by", choices=FACTORS, required=True,
                                   help="the setting the study varies")
    parsers["compare"].add_argument("--against", nargs="+", required=True, metavar="RUN_DIR",
                                    help="the second group")
    parsers["compare"].add_argument("--paired", action="store_true",
                                    help="pair the runs of one seed: a paired t test")
    q = parsers["embeddings"]
    q.add_argument("file", metavar="FILE", help="the embeddings (.npy or .npz)")
    q.add_argument("--key", metavar="NAME", help="the array of FILE that holds the embeddings")
    q.add_argument("--uniform", action="store_true",
                   help="embeddings in [0, 1]^d (uniform DM, Section 3.2): Kolmogorov-Smirnov "
                        "tests against U[0, 1], normality tests after Phi^-1")
    q.add_argument("--subsample", type=number(int, MIN_POINTS, 10 ** 6), default=128,
                   help="subsample size of the bootstrapped normality tests (as in the scripts)")
    q.add_argument("--seed", type=number(int, 0, 2 ** 32 - 1), default=0,
                   help="seed of the test subsamples, projections and MLP")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the mode: input it cannot use ends in one line on stderr and exit code 2."""
    args = parse_args(argv)
    try:
        MODES[args.mode][0](args)
    except (Refused, OSError) as err:  # OSError: a file that cannot be read or written
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
