"""Evaluate saved runs of mnist_gauss.py / mnist_uniform.py / cifar_ssl.py (Section 5).
The first word names the mode; `python evaluate.py MODE -h` describes it and its flags.

    python evaluate.py figure runs/sweep [RUN_DIR ...] --out figure1
    python evaluate.py compare RUN_DIR ... --against RUN_DIR ...
    python evaluate.py curve RUN_DIR ... --out curve
    python evaluate.py table runs/cifar_ssl [RUN_DIR ...] --out table1
    python evaluate.py renormalize RUN_DIR [RUN_DIR ...]
    python evaluate.py outliers RUN_DIR ... [--out PREFIX]
    python evaluate.py embeddings FILE [--uniform] [--key NAME] [--out report]
"""
from __future__ import annotations

import argparse
import csv
import inspect
import io
import json
import math
import pickle
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
import torch
from sklearn.model_selection import train_test_split

import common

Run = Row = dict[str, Any]
KINDS = ("trained", "no noise", "untrained", "file")  # the order of table rows

# The panels of Figure 1: (column, entry of metrics.json, title); nan where a run lacks it
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
# Poster Table 2 (VICReg, 100 epochs) by sigma: (ImageNet-100, ImageNet-1k) x (top-1, top-5)
# as (mean, std over seeds) in %
PAPER_TABLE2 = {
    0.0: ((72.18, 0.40), (92.02, 0.12), (67.41, 0.17), (87.43, 0.08)),
    0.05: ((72.27, 0.38), (91.99, 0.18), (67.29, 0.20), (87.47, 0.06)),
    0.1: ((72.07, 0.27), (91.65, 0.13), (67.30, 0.13), (87.43, 0.02)),
    0.2: ((71.68, 0.50), (91.61, 0.24), (67.19, 0.12), (87.32, 0.09))}
TABLE_DATASETS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
TABLE2_DATASETS = {100: "ImageNet-100", 1000: "ImageNet-1k"}  # by the ImageFolder's classes
METHOD_NAMES = {"simclr": "SimCLR", "vicreg": "VICReg"}
EMBEDDING_KEYS, LABEL_KEYS = ("embeddings", "z", "features", "x"), ("labels", "y", "targets")
MIN_POINTS = 8  # the fewest points the tests take (scipy's D'Agostino-Pearson test needs 8)


# --- Tables: rows of kind, noise, capacity, seeds and (mean, 99% t half-width) per measure ----
def mean_ci99(values: list[float]) -> tuple[float, float]:
    """Mean and half-width t_{0.995, n-1} s / sqrt(n) of the 99% Student t interval over n
    seeds, s the sample standard deviation (ddof 1); NaN for a single value. (The paper's
    Figure 1 gives the asymptotic z_{0.995} = 2.576 over 5 runs; t_{0.995, 2} = 9.925 for 3.)"""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return float(x.mean()), math.nan
    t = float(scipy.stats.t.ppf(0.995, len(x) - 1))
    return float(x.mean()), t * float(x.std(ddof=1)) / math.sqrt(len(x))


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """Difference of means mean(a) - mean(b) and the two-sided p-value of Welch's t test
    (unequal variances) over the seeds of two settings; nan with fewer than 2 values a side."""
    if min(len(a), len(b)) < 2:
        return float(np.mean(a) - np.mean(b)), math.nan
    with warnings.catch_warnings():  # values like 1e-254 warn of lost precision, not an error
        warnings.simplefilter("ignore", RuntimeWarning)
        return (float(np.mean(a) - np.mean(b)),
                float(scipy.stats.ttest_ind(a, b, equal_var=False).pvalue))


def table_row(kind: str, noise: float, capacity: float, values: list[dict[str, float]]) -> Row:
    """The row of a group of seeds, each measure of `values` as mean_ci99 over the seeds."""
    return {"kind": kind, "noise": noise, "capacity": capacity, "seeds": len(values),
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
    """A row's markdown cells: kind, noise, C, seeds, then each measure's mean_cell."""
    return [row["kind"], f"{row['noise']:g}", fmt(row["capacity"]), str(row["seeds"]),
            *(mean_cell(row[name], number) for name in measures)]


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table: first column left-aligned, the others right-aligned."""
    return "\n".join(["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1),
                      *("| " + " | ".join(row) + " |" for row in rows)])


def csv_text(rows: list[Row], measures: list[str], noise_key: str = "noise", newline="\n") -> str:
    """Rows as CSV: kind, noise, capacity, seeds, NAME_mean and NAME_ci99 per measure."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator=newline)
    writer.writerow(["kind", noise_key, "capacity", "seeds",
                     *(f"{name}_{stat}" for name in measures for stat in ("mean", "ci99"))])
    writer.writerows([row["kind"], row["noise"], row["capacity"], row["seeds"],
                      *(value for name in measures for value in row[name])] for row in rows)
    return buffer.getvalue()


def save_texts(prefix: str, texts: dict[str, str]) -> None:
    """PREFIX.SUFFIX for each entry, atomically, creating the folder; one line on failure."""
    try:
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        for suffix, text in texts.items():
            with common.atomic_path(f"{prefix}.{suffix}") as tmp:
                Path(tmp).write_text(text)
    except OSError as err:
        common.fail(f"cannot write {prefix}.* ({err.strerror or err})")


# --- figure: Figure 1 from many runs ----------------------------------------------------------
def find_runs(paths: list[str]) -> list[Path]:
    """Run directories (those holding metrics.json) at or below each path, in sorted order."""
    found: dict[Path, None] = {}
    for path in map(Path, paths):
        if not path.exists():
            common.fail(f"{path} does not exist")
        runs = sorted(file.parent for file in path.rglob("metrics.json")) if path.is_dir() else []
        if not runs:
            common.fail(f"{path} holds no metrics.json: expected a run directory of "
                        "mnist_gauss.py / mnist_uniform.py / cifar_ssl.py or a folder of them")
        found.update((run.resolve(), None) for run in runs)
    return list(found)


def null_bands(runs: list[Run], k: int) -> dict[str, list[float]]:
    """[low, high] per panel: common.null_band of the mean of k null draws, from the null draws
    the runs saved (one set per seed)."""
    pools: dict[str, dict[Any, list[float]]] = {}
    for run in runs:
        for name, null in run["null"].items():
            pools.setdefault(name, {})[run["seed"]] = null["values"]
    return {name: common.null_band(np.concatenate(list(pool.values())), k)
            for name, pool in pools.items()}


def load_run(path: Path) -> Run:
    """The entries of path/metrics.json that the tables need, as floats ("inf" -> inf; a test
    that was not run, null -> nan)."""
    file = path / "metrics.json"
    saved = common.read_json(file)

    def lookup(dotted: str) -> Any:  # saved["a"]["b"] for "a.b"; lists by index
        tree = saved
        for part in dotted.split("."):
            tree = tree[int(part)] if isinstance(tree, list) else tree[part]
        return tree
    try:
        family = "ssl" if "method" in saved else "eps" if "eps" in saved else "sigma"
        noise_key = "eps" if family == "eps" else "sigma"
        shared, training = SETTINGS[family]
        values = {name: math.nan if lookup(key) is None else float(lookup(key))
                  for name, key, _ in PANELS[family]}
        null = saved["normality"]["null"]
        return {"path": path, "family": family, "noise_key": noise_key,
                "noise": float(saved[noise_key]), "capacity": float(saved["capacity"]),
                "seed": saved["seed"],
                "mi_se": math.nan if family == "ssl" else float(saved["mi_heldout_se"]),
                "kind": ("untrained" if saved["steps"] == 0
                         else "no noise" if math.isinf(float(saved["capacity"])) else "trained"),
                "values": values, "null": {name: band for name, band in null.items()
                                           if isinstance(band, dict)},
                "settings": {key: lookup(key) for key in shared + training},
                "saved": saved}
    except KeyError as err:
        common.fail(f"{file} lacks the entry {err}")
    except (ValueError, TypeError, AttributeError) as err:
        common.fail(f"{file} is not a valid metrics.json ({err})")


def check_group(runs: list[Run], keys: tuple[str, ...], what: str, seeds_of: str = "") -> None:
    """Stop with one line when runs averaged together differ in one of `keys` or, with
    `seeds_of`, share a seed (it would count twice)."""
    for key in keys:
        for run in runs[1:]:
            if run["settings"][key] != runs[0]["settings"][key]:
                common.fail(f"{runs[0]['path']} and {run['path']} differ in {key} "
                            f"({runs[0]['settings'][key]!r} vs {run['settings'][key]!r}): "
                            f"{what} must share it")
    seeds: dict[Any, Path] = {}
    for run in runs if seeds_of else []:
        if run["seed"] in seeds:
            common.fail(f"{seeds[run['seed']]} and {run['path']} are both seed {run['seed']} of "
                        f"{seeds_of}: pass only one of them")
        seeds[run["seed"]] = run["path"]


def group_rows(runs: list[Run]) -> list[Row]:
    """One table_row per noise value of the trained runs, then per baseline (kind, noise).
    Refuses runs of different families, shared settings that differ and repeated seeds."""
    families = [family for family in FAMILIES if any(run["family"] == family for run in runs)]
    if len(families) > 1:
        (a, b), (first, second) = families[:2], (next(r for r in runs if r["family"] == f)
                                                 for f in families[:2])
        common.fail(f"cannot mix {FAMILIES[a][0]} ({a}) and {FAMILIES[b][0]} ({b}) runs in one "
                    f"figure: {first['path']} is {FAMILIES[a][0]}, {second['path']} is "
                    f"{FAMILIES[b][0]}")
    shared, training = SETTINGS[families[0]]
    check_group(runs, shared, "runs of one figure")
    trained = [run for run in runs if run["kind"] == "trained"]
    if not trained:
        common.fail(f"none of the {len(runs)} runs is a trained run with finite capacity C")
    check_group(trained, training, "the trained runs of one figure")
    groups: dict[tuple[int, float], list[Run]] = {}
    for run in runs:
        groups.setdefault((KINDS.index(run["kind"]), run["noise"]), []).append(run)
    rows = []
    for (_, noise), members in sorted(groups.items()):
        kind = members[0]["kind"]
        check_group(members, training if kind != "trained" else (), f"the {kind} baseline runs",
                    f"{members[0]['noise_key']} = {noise:g} ({kind})")
        rows.append(table_row(kind, noise, members[0]["capacity"],
                              [run["values"] for run in members]))
    return rows


def plot_figure1(rows: list[Row], metrics: list, symbol: str, title: str, bands: dict,
                 against_noise: bool, k: int) -> Any:
    """Figure 1: each metric against capacity C (the noise level with `against_noise`), mean over
    seeds with 99% t-interval error bars. Dashed: the bound I = C; dotted: C = log 10, below
    which the channel cannot carry the digit; dash-dotted: the baselines; grey: the null bands
    of a mean of k N(0, I) samples."""
    plt = common.pyplot()
    nrows = math.ceil(len(metrics) / 4)
    fig, axes = plt.subplots(nrows, 4, figsize=(16.8, 3.4 * nrows), squeeze=False)
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
    legend = {}  # every entry once, from whichever panel has it
    for ax in axes.flat[:len(metrics)]:
        legend.update((label, handle) for handle, label in zip(*ax.get_legend_handles_labels(),
                                                               strict=True) if label not in legend)
    fig.suptitle(title)
    fig.tight_layout()
    fig.legend(legend.values(), legend.keys(), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(len(legend), 4))
    return fig


def figure(args: argparse.Namespace) -> None:
    """Figure 1: each measure against the capacity C (cifar_ssl.py runs: against sigma), mean
    over seeds with the 99% Student t interval, the sigma = 0 and untrained baselines, the null
    band of a mean of as many N(0, I) samples of the same n and d; writes PREFIX.png, .pdf, .md,
    .csv, prints the table and every run whose MI estimate exceeds C by more than 3 standard
    errors (a bug detector). mnist_gauss.py runs also give PREFIX_certificate.md, .csv."""
    runs, prefix = [load_run(path) for path in find_runs(args.runs)], args.out
    rows, ssl, settings = group_rows(runs), runs[0]["family"] == "ssl", runs[0]["settings"]
    (family, symbol, equation), metrics = FAMILIES[runs[0]["family"]], PANELS[runs[0]["family"]]
    trained = [run for run in runs if run["kind"] == "trained"]
    first = trained[0]["settings"]
    model = (f"{first['method']} {first['arch']}, projector output" if ssl
             else f"{first['critic']} critic,")
    about = (f"{family} DM, {model} d = {settings['dim']}, {settings['data.dataset']}, "
             f"{first['steps']} steps, "
             f"normality tests on {settings['normality.subsample']}-point subsamples")
    titles = {name: title for name, _, title in metrics}
    # the runs share n, d and subsample size: a row of k seeds gets the band of a mean of k draws
    ks = sorted({row["seeds"] for row in rows})
    bands = {k: null_bands(runs, k) for k in ks}
    band_rows = [[f"null band, mean of {k}", "", "", "", *(
        "{} to {}".format(*map(fmt, bands[k][name])) if name in bands[k] else ""
        for name in titles)] for k in ks]
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
            + f"\n\n{null}\n\n{check}\n")
    save_texts(prefix, {"md": text, "csv": csv_text(rows, list(titles), runs[0]["noise_key"])})
    certificate_md, certificate_csv = certificate(runs)
    if certificate_md:
        save_texts(f"{prefix}_certificate", {"md": certificate_md, "csv": certificate_csv})
        text += f"\n{certificate_md}\nsaved {prefix}_certificate.md, {prefix}_certificate.csv\n"
    k = min(row["seeds"] for row in rows if row["kind"] == "trained")
    fig = plot_figure1(rows, metrics, symbol, f"Figure 1: {about}", bands[k], ssl, k)
    for suffix in ("png", "pdf"):
        common.save_figure(fig, f"{prefix}.{suffix}")
    print(text + f"\nsaved {prefix}.png, {prefix}.pdf, {prefix}.md, {prefix}.csv")


CURVE = [("sliced_w2", "sliced W2 to N(0, I), test"), ("sliced_w2_train", "sliced W2, train"),
         ("knn_acc", "k-NN accuracy"), ("mi_over_c", "held-out MI / C")]
"""The panels of a curve: entries of a curve point of mnist_gauss.py --eval-at / --eval-every."""


def curve(args: argparse.Namespace) -> None:
    """Sliced W2 (test and train), k-NN and MI / C against training steps (log axis) of runs
    written with mnist_gauss.py --eval-at: per sigma the seeds (thin) and their mean (thick),
    the null band of the mean of k N(0, I) samples of the test (or training) set's size, k =
    seeds per sigma; writes PREFIX.png, .pdf, .md."""
    runs, prefix = [load_run(path) for path in find_runs(args.runs)], args.out
    needs = {name for name, _ in CURVE[:3]} | {"mi_heldout"}
    if missing := [str(run["path"]) for run in runs if not run["saved"].get("curve") or any(
            needs - point.keys() for point in run["saved"]["curve"])]:
        common.fail(f"{missing[0]} has no curve of sliced W2, k-NN and MI: run mnist_gauss.py "
                    "with --eval-at or --eval-every")
    check_group(runs, SETTINGS["sigma"][0] + ("critic", "loss", "batch_size"), "runs of a curve")
    groups: dict[float, list[Run]] = {}
    for run in runs:
        groups.setdefault(run["noise"], []).append(run)
    n_train = runs[0]["saved"]["data"]["n_train"]
    rng = np.random.default_rng(0)
    train_draws = [common.sliced_w2(rng.standard_normal((n_train, runs[0]["saved"]["dim"])))
                   for _ in range(common.NULL_DRAWS)]
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(CURVE), figsize=(4.2 * len(CURVE), 3.6))
    # the runs share n and d: a sigma of k seeds gets the band of a mean of k draws
    bands = {k: {"sliced_w2": null_bands(runs, k)["sliced_w2"],
                 "sliced_w2_train": common.null_band(train_draws, k)}
             for k in sorted({len(members) for members in groups.values()})}
    rows = []
    for i, (noise, members) in enumerate(sorted(groups.items())):
        steps = sorted(set.intersection(*({p["step"] for p in run["saved"]["curve"]}
                                          for run in members)))
        points = [{p["step"]: p for p in run["saved"]["curve"]} for run in members]
        values = {name: np.array([[point[t][name] for t in steps]
                                  for point in points], dtype=np.float64) for name, _ in CURVE[:3]}
        capacity = members[0]["capacity"] if noise else math.nan  # sigma = 0: C = inf, no line
        values["mi_over_c"] = np.array([[point[t]["mi_heldout"] / capacity for t in steps]
                                        for point in points])
        k = len(members)
        label = f"σ = {noise:g}" + (" (no noise)" if noise == 0 else "")
        for ax, (name, title) in zip(axes, CURVE, strict=True):
            ax.plot(steps, values[name].T, color=f"C{i}", linewidth=0.6, alpha=0.5)
            ax.plot(steps, values[name].mean(0), "o-", color=f"C{i}", label=label)
            ax.set(xscale="log", yscale="log" if name.startswith("sliced") else "linear",
                   xlabel="training steps", title=title)
        for j, t in enumerate(steps):
            rows.append([f"{noise:g}", str(t), str(k), *(
                mean_cell(mean_ci99(values[name][:, j]), fmt) if noise or name != "mi_over_c"
                else "(C = inf)" for name, _ in CURVE)])
    for ax, (name, _) in zip(axes, CURVE, strict=True):
        for k, band in bands.items():
            if name in band:
                ax.axhspan(*band[name], color="0.5", alpha=0.3,
                           label=f"null band (mean of {k})" if ax is axes[0] else None)
    axes[0].legend(fontsize=8)
    setting = runs[0]["settings"]
    about = (f"{runs[0]['saved']['critic']} critic, d = {setting['dim']}, "
             f"{setting['data.dataset']}, batch {runs[0]['saved']['batch_size']}")
    fig.suptitle(f"Matching against training steps ({about})")
    fig.tight_layout()
    for suffix in ("png", "pdf"):
        common.save_figure(fig, f"{prefix}.{suffix}")
    band_text = "; ".join(f"mean of {k}: test {' to '.join(map(fmt, b['sliced_w2']))}, train "
                          f"{' to '.join(map(fmt, b['sliced_w2_train']))}"
                          for k, b in sorted(bands.items()))
    text = (f"Matching against training steps ({about}): mean ± half-width of the 99% Student t "
            "interval over seeds\n\n" + md_table(["σ", "step", "seeds", *(t for _, t in CURVE)],
                                                  rows)
            + f"\n\nsliced W2 null band (central {100 * common.BAND_SHARE:g}% of the mean of k "
            f"N(0, I) samples; test n = {runs[0]['saved']['data']['n_test']}, train n = "
            f"{n_train}): {band_text}\n")
    save_texts(prefix, {"md": text})
    print(text + f"\nsaved {prefix}.png, {prefix}.pdf, {prefix}.md")


def mi_check(runs: list[Run], estimates: dict[str, Any], equation: str) -> str:
    """A bug detector, not a test of Theorems 3.4 / 3.5: a lower bound on I(f(X'); f(X) + Z)
    cannot exceed C (eqs. 5, 6) in expectation, so an estimate above C + 3 SE (any excess without
    an SE) flags a broken estimator, capacity or run. `estimates`: label -> run -> (value, SE)."""
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
    """The DM certificate per run (mnist_gauss.py's mi_estimates): C - I_hat bounds
    D_KL(f(X) + Z || N(0, (1 + sigma^2) I)) plus the non-invariance term I(f(X) + Z; f(X) | f(X'))
    (Lemma B.1) only where I_hat is a lower bound in expectation: InfoNCE and NWJ (eqs. 2-3) with
    the trained and the Theorem 4.1 critic, on the test batches and on one batch of up to 2000
    test images; the tightest is C minus the largest of them. The plug-in DV is biased upwards
    (log of a sample mean), shown but not used. ("", "") when no run has them."""
    runs = [run for run in runs if run["kind"] == "trained" and math.isfinite(run["capacity"])
            and "mi_estimates" in run["saved"]]
    if not runs:
        return "", ""
    first = runs[0]["saved"]["mi_estimates"]
    batch, whole = first["batch"], first["n_test"]
    columns = {"trained.infonce.batch": f"InfoNCE, B = {batch}",
               "trained.infonce.whole": f"InfoNCE, B = {whole}",
               "trained.nwj.whole": f"NWJ, B = {whole}",
               "theorem41.infonce.whole": "InfoNCE, Thm 4.1 critic",
               "theorem41.nwj.whole": "NWJ, Thm 4.1 critic",
               "theorem41.dv.whole": "DV, Thm 4.1 critic (biased up, not a bound)",
               "gap": "C − largest lower bound"}
    bounds = [column for column in columns if ".dv." not in column and column != "gap"]

    def estimate(run: Run, column: str) -> tuple[float, float]:
        critic, name, where = column.split(".")
        found = run["saved"]["mi_estimates"].get(critic)
        return tuple(found[name][where]) if found else (math.nan, math.nan)
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
            "are not capped. C − largest lower bound (per run, over InfoNCE and NWJ) bounds "
            "KL(f(X) + Z ‖ N(0, (1 + σ²) I)) plus the non-invariance term I(f(X) + Z; f(X) | "
            "f(X')) (Lemma B.1), nothing about f(X) alone; a lower bound short of C certifies "
            "nothing\n\n" + md_table(["runs", "σ", "C", "seeds", *columns.values()],
                                      [row_cells(row, list(columns)) for row in rows])
            + f"\n\n{check}\n")
    return text, csv_text(rows, list(columns), "sigma")


def compare(args: argparse.Namespace) -> None:
    """Every measure of two groups of runs (the seeds of two settings or critics): mean ± 99%
    t interval per group, the difference of means and the two-sided p-value of Welch's t test."""
    groups = [[load_run(path) for path in find_runs(group)] for group in (args.runs, args.against)]
    for name, group in zip("AB", groups, strict=True):
        check_group(group, ("dim", "data.n_test"), f"the runs of group {name}", f"group {name}")
    rows = []
    for name, _, title in [panel for panel in PANELS[groups[0][0]["family"]]  # shared measures
                           if all(panel[0] in run["values"] for run in groups[1])]:
        a, b = ([run["values"][name] for run in group] for group in groups)
        diff, p = welch(a, b)
        rows.append([title, mean_cell(mean_ci99(a)), mean_cell(mean_ci99(b)), fmt(diff), fmt(p)])
    print(f"A: {len(groups[0])} runs, B: {len(groups[1])} runs; mean ± 99% t interval, Welch's "
          "t test of A − B (two-sided)\n\n"
          + md_table(["measure", "A", "B", "A − B", "Welch p"], rows))


# --- table: Table 1 (and poster Table 2) from cifar_ssl.py runs -----------------------------
def probe_cell(values: list[float], paper: float | tuple | None, std: bool) -> str:
    """Our mean in % (± 99% t half-width over seeds, or ± std (ddof 1) with `std`, when there
    are several), then the paper's number (or mean ± std) in parentheses; "–" where none."""
    ours = "–" if not values else mean_cell(
        (np.mean(values), np.std(values, ddof=1) if len(values) > 1 else math.nan) if std
        else mean_ci99(values), lambda x: f"{100 * x:.2f}")
    if isinstance(paper, tuple):
        return ours + f" ({paper[0]:.2f} ± {paper[1]:.2f})"
    return ours + ("" if paper is None else f" ({paper:.2f})")


def probe_table(runs: list[Run], key_of: Any, label_of: Any, column_of: Any, columns: dict,
                paper: dict, std: bool) -> str:
    """Linear-probe top-1 / top-5 per column_of(run), ours beside `paper[row]` (in column
    order): one row per key_of(run) or paper key, one for random-init encoders. The runs of a
    cell are seeds of one setting: they must share it and differ in their seeds."""
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
    lines = [[label, *(probe_cell([run["saved"]["probe"][key] for run in cells.get((row, col), [])],
                                  paper[row][2 * c + k] if row in paper and 2 * c + k < len(
                                      paper[row]) else None, std)
                       for c, col in enumerate(columns) for k, key in enumerate(("top1", "top5")))]
             for row, label in rows]
    header = ["σ" if std else "",
              *(f"{name} top-{k}" for name in columns.values() for k in (1, 5))]
    settings = sorted({(columns[column_of(r)], r["saved"]["arch"], round(r["saved"]["epochs"], 2),
                        r["saved"]["batch_size"], r["saved"]["probe_images"]["train"])
                       for r in runs})
    return (md_table(header, lines) + f"\n\nour runs ({len(runs)}): " + "; ".join(
        f"{d}: {arch}, {epochs:g} epochs, batch {batch}, probe on {n} images"
        for d, arch, epochs, batch, n in settings) + "\n")


def table1_row(run: Run) -> tuple[str, float, bool]:
    """Table 1 row of a run: method, sigma and whether it has the BatchNorm head (sigma = 0 with
    the head is a row of its own after the original method, the paper's sigma = 0 row)."""
    return run["saved"]["method"], run["noise"], run["saved"]["head"] == "bn"


def table1_label(key: tuple[str, float, bool]) -> str:
    method, sigma, with_head = key
    return METHOD_NAMES[method] + (f" σ = {sigma:g}" if sigma else "") + (
        ", BatchNorm head, no noise" if with_head and not sigma else "")


def table(args: argparse.Namespace) -> None:
    """Table 1 in the paper's layout (linear-probe top-1 / top-5 of cifar_ssl.py runs next to
    the paper's, method x sigma rows, a column pair per data set) and poster Table 2 (one row
    per sigma, mean ± std over seeds) for VICReg on an ImageFolder tree of 100 or 1000 classes
    at 128 px or more; prints them, writes PREFIX.md."""
    runs, prefix = [], args.out
    for path in find_runs(args.runs):
        if "method" not in common.read_json(path / "metrics.json"):
            common.fail(f"{path} is not a cifar_ssl.py run (its metrics.json has no method)")
        runs.append(load_run(path))
    imagenet = [run for run in runs if run["saved"]["dataset"] == "folder"
                and run["saved"]["method"] == "vicreg"
                and run["saved"]["data"].get("n_classes") in TABLE2_DATASETS
                and run["saved"]["data"].get("image_size", 0) >= 128]
    others = [run for run in runs if all(run is not r for r in imagenet)]
    parts = []
    if others or not imagenet:
        datasets = {**TABLE_DATASETS, **{d: d for d in sorted(
            {run["saved"]["dataset"] for run in others} - set(TABLE_DATASETS))}}
        parts.append("Table 1: linear-probe accuracy (%) on the test split, ours (paper's in "
                     "parentheses: ResNet-18, 800 epochs, batch 256)\n\n" + probe_table(
                         others, table1_row, table1_label, lambda r: r["saved"]["dataset"],
                         datasets, {(*key, key[1] != 0): v for key, v in PAPER_TABLE1.items()},
                         std=False))
    if imagenet:
        parts.append("Table 2 (poster): VICReg linear-probe accuracy (%) on the validation "
                     "split, ours (poster's in parentheses: ResNet-50, 100 epochs; mean ± std "
                     "over seeds)\n\n" + probe_table(
                         imagenet, lambda r: r["noise"], "{:g}".format,
                         lambda r: r["saved"]["data"]["n_classes"], TABLE2_DATASETS,
                         PAPER_TABLE2, std=True))
    text = "\n".join(parts)
    save_texts(prefix, {"md": text})
    print(text + f"\nsaved {prefix}.md")


# --- embeddings: the report on saved embeddings (a run's or another model's) ------------------
def read_arrays(file: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npy ("" for the one array), .npz, .pt / .pth or .csv (numeric, one row
    per sample, a first row that is not numeric is a header) file."""
    if not file.is_file():
        common.fail(f"{file} does not exist" if not file.exists() else f"{file} is not a file")
    suffix = file.suffix.lower()
    if suffix not in (".npy", ".npz", ".pt", ".pth", ".csv"):
        common.fail(f"{file}: unknown format {suffix or '(no suffix)'}; expected .npy, .npz, .pt, "
                    ".pth or .csv")
    try:
        if suffix == ".npy":
            return {"": np.load(file, allow_pickle=False)}
        if suffix == ".npz":
            with np.load(file, allow_pickle=False) as archive:
                return {key: archive[key] for key in archive.files}
        if suffix == ".csv":
            with open(file, newline="") as fh:
                rows = [row for row in csv.reader(fh) if row]
            try:
                return {"": np.array(rows, dtype=np.float64)}
            except ValueError:  # a header row
                return {"": np.array(rows[1:], dtype=np.float64)}
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, ValueError, EOFError, RuntimeError, zipfile.BadZipFile,
            pickle.UnpicklingError, UnicodeDecodeError) as err:
        common.fail(f"{file} is not a readable {suffix} file ({str(err).strip().splitlines()[0]})")
    items = loaded.items() if isinstance(loaded, dict) else [("", loaded)]
    arrays = {str(key): (value.detach().float() if value.dtype in (torch.bfloat16, torch.float16)
                         else value.detach()).numpy()
              for key, value in items if isinstance(value, torch.Tensor)}
    if not arrays:
        common.fail(f"{file} holds a {type(loaded).__name__} without tensors: expected a tensor "
                    "or a dict of tensors")
    return arrays


def check_embeddings(z: np.ndarray, what: str) -> np.ndarray:
    """z as an (n, d) float64 array, or one line and exit 2 where the tests cannot use it:
    complex or non-numeric values, NaN / inf, fewer than MIN_POINTS rows, a constant column, or
    a column whose scale under- or overflows the tests' moments in double precision."""
    if z.dtype.kind not in "biuf":
        common.fail(f"{what} holds {'complex' if z.dtype.kind == 'c' else 'non-numeric'} values "
                    f"({z.dtype}): embeddings must be real numbers")
    z = np.asarray(z, dtype=np.float64)
    z = z[:, None] if z.ndim == 1 else z
    if z.ndim != 2 or 0 in z.shape:
        common.fail(f"{what}: expected an (n, d) array of embeddings, got shape {z.shape}")
    if not np.isfinite(z).all():
        common.fail(f"{what} holds {int((~np.isfinite(z)).sum())} NaN or infinite values")
    if len(z) < MIN_POINTS:
        common.fail(f"{what} holds {len(z)} points: the normality tests need at least {MIN_POINTS}")
    peak = np.abs(z).max(axis=0)  # the sd of z / peak cannot under- or overflow
    sd = (z / np.where(peak > 0, peak, 1)).std(axis=0) * peak
    for j, s in enumerate(sd):
        if s == 0:
            common.fail(f"{what}: column {j} is constant ({z[0, j]:g}); the tests need "
                        "variation in every coordinate (drop the column)")
        if not 1e-50 <= s <= 1e50:
            common.fail(f"{what}: column {j} has standard deviation {s:.1e}, outside [1e-50, "
                        "1e50] where the tests' moments under- or overflow in double precision; "
                        "rescale it")
    return z


def check_labels(y: np.ndarray, n: int, what: str) -> np.ndarray:
    """n labels of two classes or more, or one line and exit 2."""
    y = np.asarray(y).reshape(-1) if np.ndim(y) == 2 and 1 in np.shape(y) else np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        common.fail(f"{what} has shape {y.shape}: expected {n} labels, one per embedding")
    if len(np.unique(y)) < 2:
        common.fail(f"{what} holds a single class: the downstream scores and the silhouette "
                    "need two")
    return y


def pick_arrays(arrays: dict[str, np.ndarray], file: Path, key: str | None, seed: int) -> tuple:
    """(tested embeddings, (z_train, y_train, z_test, y_test) or None, where they come from):
    a run's z_test (with z_train, y_train, y_test), else the array `key`, the one array named
    in EMBEDDING_KEYS or the one 2-D array, labels from LABEL_KEYS split 80/20 (stratified)."""
    found = ", ".join(f"{name or 'the array'} {a.shape}" for name, a in arrays.items())
    if key is None and "z_test" in arrays:
        z = check_embeddings(arrays["z_test"], f"{file} (z_test)")
        if not {"z_train", "y_train", "y_test"} <= arrays.keys():
            return z, None, "z_test"
        z_tr = check_embeddings(arrays["z_train"], f"{file} (z_train)")
        if z_tr.shape[1] != z.shape[1]:
            common.fail(f"{file}: z_train has {z_tr.shape[1]} columns, z_test {z.shape[1]}")
        return z, (z_tr, check_labels(arrays["y_train"], len(z_tr), f"{file} (y_train)"), z,
                   check_labels(arrays["y_test"], len(z), f"{file} (y_test)")), "z_test"
    if key is not None and key not in arrays:
        common.fail(f"{file} holds no array {key!r}; it holds: {found}")
    candidates = ([key] if key is not None else [k for k in EMBEDDING_KEYS if k in arrays]
                  or [k for k, a in arrays.items() if a.ndim == 2]
                  or (list(arrays) if len(arrays) == 1 else []))
    if len(candidates) != 1:
        common.fail(f"{file}: cannot tell which array holds the embeddings (found {found}); "
                    "name it with --key NAME")
    key = candidates[0]
    z = check_embeddings(arrays[key], f"{file} ({key or 'the array'})")
    label = next((name for name in LABEL_KEYS if name in arrays and name != key), None)
    if label is None:
        return z, None, key or "the array"
    y = check_labels(arrays[label], len(z), f"{file} ({label})")
    try:
        z_tr, z_te, y_tr, y_te = train_test_split(z, y, test_size=0.2, random_state=seed,
                                                  stratify=y)
    except ValueError:  # a class with a single member cannot be stratified
        z_tr, z_te, y_tr, y_te = train_test_split(z, y, test_size=0.2, random_state=seed)
    return z, (z_tr, y_tr, z_te, y_te), f"{key}, labels from {label}, seeded stratified 80/20 split"


def embeddings_report(file: Path, key: str | None, uniform: bool, subsample: int,
                      seed: int) -> dict:
    """Section 5 report of saved embeddings (downstream scores when labelled). `uniform`
    (Section 3.3): embeddings in [0, 1]^d, tested against U[0, 1] per coordinate
    (Kolmogorov-Smirnov) and for normality after the probability integral transform Phi^-1."""
    z, labelled, source = pick_arrays(read_arrays(file), file, key, seed)
    if uniform and (z.min() < 0 or z.max() > 1):
        common.fail(f"{file}: --uniform needs embeddings in [0, 1], found [{z.min():.3g}, "
                    f"{z.max():.3g}]")
    report: dict[str, Any] = {"file": str(file), "arrays": source, "n": len(z),
                              "dim": z.shape[1], "uniform": uniform}
    if uniform:
        report["uniformity"] = common.uniformity_report(z)
    report["normality"] = common.normality_report(common.to_gaussian(z) if uniform else z,
                                                  seed=seed, subsample=subsample)
    if labelled:
        report["downstream"] = common.downstream_report(*labelled, seed=seed)
    if not np.isfinite([v for v in report["normality"].values() if isinstance(v, float)]).all():
        common.fail(f"{file}: the normality tests returned NaN on these embeddings")
    return report


def report_lines(report: dict[str, Any]) -> list[str]:
    """The embeddings report as text."""
    lines = [f"{report['file']} ({report['arrays']}): n = {report['n']}, d = {report['dim']}"
             + (", tested after the PIT Phi^-1 (--uniform)" if report["uniform"] else "")]
    if "uniformity" in report:
        lines.append(f"uniformity: Kolmogorov-Smirnov p (mean over coordinates) "
                     f"{report['uniformity']['ks_p_mean']:.3f}, largest D "
                     f"{report['uniformity']['ks_stat_max']:.3f}")
    lines += common.normality_lines(report["normality"])
    if "downstream" in report:
        d = report["downstream"]
        lines.append(f"downstream: k-NN {d['knn_acc']:.4f}   GaussianNB {d['gnb_acc']:.4f}   "
                     f"MLP {d['mlp_acc']:.4f}   silhouette {d['silhouette']:.3f}")
    return lines


def embeddings(args: argparse.Namespace) -> None:
    """The Section 5 report on a run's embeddings.npz or any .npy, .npz, .pt / .pth or .csv
    (one row per sample): averaged p-values beside their null levels, the sliced W2 distance to
    N(0, I) beside its null band, a test calibrated at 5%; labels (a run's y_test, or labels /
    y / targets split 80/20) add downstream scores; --out PREFIX writes PREFIX.json."""
    report = embeddings_report(Path(args.file), args.key, args.uniform, args.subsample, args.seed)
    print("\n".join(report_lines(report)))
    if args.out:
        out = Path(f"{args.out.removesuffix('.json')}.json")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            common.write_json(report, out)
        except OSError as err:
            common.fail(f"cannot write {out} ({err.strerror or err})")
        print(f"saved {out}")


# --- renormalize: renew the normality block of runs from their embeddings ------------------
def renormalize(args: argparse.Namespace) -> None:
    """Recompute each run's normality block from RUN/embeddings.npz (z_test) with the settings
    and seed it recorded, and write it into RUN/metrics.json atomically, keeping the rest (a
    run's metrics from its model.pt: python SCRIPT.py --out RUN_DIR --eval-only)."""
    for run in find_runs(args.runs):
        metrics = common.read_json(run / "metrics.json")
        if not {"sigma", "eps"} & metrics.keys():
            common.fail(f"{run}: renormalize takes runs of mnist_gauss.py / mnist_uniform.py "
                        "/ cifar_ssl.py")
        z = pick_arrays(read_arrays(run / "embeddings.npz"), run / "embeddings.npz", None, 0)[0]
        old = metrics.get("normality", {})
        try:
            new = common.normality_report(
                common.to_gaussian(z) if "eps" in metrics else z, seed=metrics["seed"],
                subsample=old["subsample"], n_proj=old["n_proj"], n_boot=old["n_boot"],
                points=old.get("points"))
        except (KeyError, TypeError) as err:
            common.fail(f"{run / 'metrics.json'} lacks the seed or normality settings ({err})")
        same = all(new[k] == old.get(k) or isinstance(old.get(k), float) and math.isclose(
            new[k], old[k], rel_tol=1e-9) for k in ("dagostino_p", "shapiro_p", "henze_zirkler_p"))
        common.write_json({**metrics, "normality": new}, run / "metrics.json")
        verdict = ("reproduced (to 1e-9)" if same else "differ from the saved ones (other "
                   "embeddings or library versions)")
        print("\n".join([f"{run}: averaged p-values {verdict}", *common.normality_lines(new)]))


# --- outliers: from the known prior against the fitted detector ------------------------------
def outlier_arrays(file: Path, uniform: bool, prior: str) -> dict[str, np.ndarray]:
    """The train / test / shifted embeddings of an embeddings.npz written with --ood (one line
    and exit 2 when unusable, or when `prior` contradicts the run's `uniform` head)."""
    if prior != "auto" and uniform != (prior == "uniform"):
        common.fail(f"{file}: embeddings of a {'uniform' if uniform else 'Gaussian'} DM run; the "
                    f"{prior} prior does not apply (drop --prior or pass --prior "
                    f"{'uniform' if uniform else 'gaussian'})")
    arrays = read_arrays(file)
    shifted = {key.removeprefix("z_ood_"): check_embeddings(value, f"{file}:{key}")
               for key, value in arrays.items() if key.startswith("z_ood_")}
    if not shifted or not {"z_train", "z_test"} <= set(arrays):
        common.fail(f"{file} holds no out-of-distribution embeddings (z_ood_<name>) beside "
                    "z_train and z_test: run the script with --ood fashion-mnist inverted noise")
    return {"z_train": check_embeddings(arrays["z_train"], f"{file}:z_train"),
            "z_test": check_embeddings(arrays["z_test"], f"{file}:z_test"), **shifted}


def outliers(args: argparse.Namespace) -> None:
    """Outlier detection on runs written with --ood (or an embeddings file): false-alarm and
    detection rates of the prior rule (chi^2_d p-value of ||z||^2, after Phi^-1 for uniform DM)
    and of the fitted Mahalanobis rule at alpha = 0.01, 0.05, 0.10, and AUROC; runs give one
    table over the noise level, mean +- 99% t interval; --out PREFIX writes .md, .csv, .json."""
    prior, prefix = args.prior, args.out
    sources = ([(Path(args.embeddings), prior == "uniform", ("file", math.nan, math.nan))]
               if args.embeddings else
               [(run["path"] / "embeddings.npz", run["family"] == "eps",
                 (run["kind"], run["noise"], run["capacity"]))
                for run in map(load_run, find_runs(args.runs))])
    groups: dict[tuple[str, float, float], list[dict[str, Any]]] = {}
    for file, uniform, key in sources:
        arrays = outlier_arrays(file, uniform, prior)
        groups.setdefault(key, []).append(common.outlier_report(
            arrays.pop("z_train"), arrays.pop("z_test"), arrays, uniform=uniform))
    alphas, shifts, rules = list(groups[next(iter(groups))][0]["alphas"]), [], ("prior", "fitted")
    for reports in groups.values():
        shifts += [name for name in reports[0]["auroc"] if name not in shifts]
    alarms = {f"false_alarm_{rule}_{a}": ("false_alarm", rule, a) for rule in rules for a in alphas}
    measures = {**alarms, **{f"{what}_{rule}_{name}": (what, rule, name) for name in shifts
                             for what in ("detect_at_0.05", "auroc") for rule in rules}}

    def measure(r: dict[str, Any], what: str, rule: str, key: str) -> float:
        if what == "false_alarm":
            return r["alphas"][key][rule]["false_alarm"]
        if what == "auroc":
            return r["auroc"].get(key, {}).get(rule, math.nan)
        return r["alphas"]["0.05"][rule].get(f"detect_{key}", math.nan)
    rows = []
    for (kind, noise, capacity), reports in sorted(
            groups.items(), key=lambda item: (KINDS.index(item[0][0]), item[0][1])):
        values = [{name: measure(r, *spec) for name, spec in measures.items()} for r in reports]
        rows.append(table_row(kind, noise, capacity, values))
    head, three = ["runs", "noise", "C", "seeds"], "{:.3f}".format
    text = ("Outliers from the prior: false-alarm rate on the held-out test embeddings (nominal "
            "= alpha), mean ± 99% t interval over seeds\n\n"
            + md_table(head + [f"{rule} α={a}" for rule in rules for a in alphas],
                       [row_cells(row, list(alarms), three) for row in rows])
            + "\n\nDetection rate at α = 0.05 and AUROC on each shifted set\n\n"
            + md_table(head + ["shift", "prior detect", "fitted detect", "prior AUROC",
                               "fitted AUROC"],
                       [row_cells(row, [], three) + [name] + [
                           mean_cell(row[f"{what}_{rule}_{name}"], three)
                           for what in ("detect_at_0.05", "auroc") for rule in rules]
                        for row in rows for name in shifts]) + "\n")
    print(text)
    if prefix:
        save_texts(prefix, {"md": text, "csv": csv_text(rows, list(measures), newline="\r\n"),
                            "json": json.dumps([{"kind": k, "noise": n, "reports": r}
                                                for (k, n, _), r in groups.items()],
                                               indent=1, default=str)})
        print(f"saved {prefix}.md, {prefix}.csv, {prefix}.json")


# --- Command line ------------------------------------------------------------------------------
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show the defaults and keep the mode list of the module docstring as written."""


# The flags of the single-command form before the modes -> the command that replaced each
REPLACED = {"--table": "python evaluate.py table RUN_DIR ...",
            "--curve": "python evaluate.py curve RUN_DIR ...",
            "--renormalize": "python evaluate.py renormalize RUN_DIR ...",
            "--outliers": "python evaluate.py outliers RUN_DIR ...",
            "--against": "python evaluate.py compare RUN_DIR ... --against RUN_DIR ...",
            "--json-out": "python evaluate.py embeddings FILE --out PREFIX (writes PREFIX.json)",
            "--embeddings": "python evaluate.py embeddings FILE",
            "--checkpoint": "python SCRIPT.py --out RUN_DIR --eval-only (the run's own script; "
                            "it writes RUN_DIR/metrics_recomputed.json)"}


MODES = {"figure": (figure, "Figure 1: each measure against the capacity C"),
         "compare": (compare, "two groups of seeds: Welch's t test per measure"),
         "curve": (curve, "the measures against training steps (runs written with --eval-at)"),
         "table": (table, "Table 1 (and poster Table 2) from cifar_ssl.py runs"),
         "renormalize": (renormalize, "renew the normality block of runs from embeddings.npz"),
         "outliers": (outliers, "outliers from the prior against the fitted Mahalanobis rule"),
         "embeddings": (embeddings, "the Section 5 report on saved embeddings")}
OUT_DEFAULTS = {"figure": "figure1", "curve": "curve", "table": "table1", "outliers": None,
                "embeddings": None}  # the modes that write files


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    modes = p.add_subparsers(dest="mode", required=True, metavar="MODE")
    parsers = {}
    for name, (function, text) in MODES.items():  # the description: the function's docstring
        q = parsers[name] = modes.add_parser(name, help=text, formatter_class=HelpFormatter,
                                             description=inspect.cleandoc(function.__doc__))
        if name != "embeddings":
            q.add_argument("runs", nargs="*" if name == "outliers" else "+", metavar="RUN_DIR",
                           help="run directories, or folders searched recursively for them "
                                "(those holding metrics.json)")
        if name in OUT_DEFAULTS:
            q.add_argument("--out", metavar="PREFIX", default=OUT_DEFAULTS[name],
                           help="the prefix of the files written (None: print only)")
    parsers["compare"].add_argument("--against", nargs="+", required=True, metavar="RUN_DIR",
                                    help="the second group")
    o = parsers["outliers"]
    o.add_argument("--embeddings", metavar="FILE", help="an embeddings.npz instead of runs")
    o.add_argument("--prior", choices=["auto", "gaussian", "uniform"], default="auto",
                   help="the prior of the embeddings (auto: from the run)")
    q = parsers["embeddings"]
    q.add_argument("file", metavar="FILE", help="the embeddings")
    q.add_argument("--key", metavar="NAME", help="the array of FILE that holds the embeddings")
    q.add_argument("--uniform", action="store_true",
                   help="embeddings in [0, 1]^d (uniform DM, Section 3.3): Kolmogorov-Smirnov "
                        "tests against U[0, 1], normality tests after Phi^-1")
    q.add_argument("--subsample", type=common.bounded(int, MIN_POINTS), default=128,
                   help="subsample size of the bootstrapped normality tests (as in the scripts)")
    q.add_argument("--seed", type=common.seed_int, default=0,
                   help="seed of the test subsamples, projections, split and MLP")
    if argv and argv[0] not in MODES and argv[0] not in ("-h", "--help"):
        old = next((flag for flag in REPLACED if flag in argv), None)
        p.error(f"{old} is now {REPLACED[old]}" if old else "name the mode first, e.g. python "
                f"evaluate.py figure RUN_DIR ... (modes: {', '.join(MODES)})")
    args = p.parse_args(argv)
    if args.mode == "outliers" and bool(args.runs) == (args.embeddings is not None):
        o.error("give run directories or --embeddings FILE (one of them)")
    if args.mode == "outliers" and args.embeddings and args.prior == "auto":
        o.error("--embeddings FILE needs --prior gaussian or --prior uniform")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    MODES[args.mode][0](args)


if __name__ == "__main__":
    main()
