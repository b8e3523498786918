"""Report figures of one (model, calibration set): matplotlib, Agg backend, PNG.

- hidden_error.png: per-layer relative MSE of the decoder-layer outputs vs fp, vision and text
  positions side by side, one line per run.
- alpha.png: the α the search chose per layer, one panel per scale group, one line per run.
- metrics.png: caption NLL (as its difference to fp), KL, mean hidden error (vision, text) per run, fp
  included, and each lmms-eval score of the summary (e.g. the organism's task accuracy) when lmms_eval
  is enabled.
Every run has its own colour, the same in all three figures; the runs of one method share its hue.
"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from vlmquant.eval.lmms_results import COLUMN_PREFIX  # noqa: E402
from vlmquant.eval.table import read_table  # noqa: E402
from vlmquant.io.atomic import atomic_path  # noqa: E402
from vlmquant.report.summary import STATS  # noqa: E402

# a hue family per method; the runs of one method get shades of it (colour by run, method by hue)
METHOD_CMAPS = {"fp": "Greys", "rtn": "Reds", "awq": "Blues", "mbq": "Greens", "smoothquant": "Purples"}
OTHER_CMAPS = ("Oranges", "YlOrBr", "PuRd", "BuGn")
STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P")


def run_colors(runs, methods):
    """{run: RGBA}: every run its own colour, the runs of one method shades of that method's hue, from
    mid to dark (the light end of a colour map is too pale on white). Methods without a family of their
    own take the next of OTHER_CMAPS."""
    by_method = {}
    for run in runs:
        by_method.setdefault(methods.get(run, ""), []).append(run)
    spare = iter(OTHER_CMAPS * 4)
    out = {}
    for method, members in by_method.items():
        cmap = matplotlib.colormaps[METHOD_CMAPS.get(method) or next(spare)]
        n = len(members)
        for k, run in enumerate(members):
            out[run] = cmap(0.75 if n == 1 else 0.45 + 0.5 * k / (n - 1))
    return out


def run_styles(runs, methods):
    """A (color, linestyle, marker) per run: colour by run (run_colors); line style and marker tell the runs
    of one method apart once more, for print and colour-blind readers."""
    colors = run_colors(runs, methods)
    seen, out = {}, {}
    for n, run in enumerate(runs):
        k = seen.get(methods.get(run, ""), 0)
        seen[methods.get(run, "")] = k + 1
        out[run] = (colors[run], STYLES[k % len(STYLES)], MARKERS[n % len(MARKERS)])
    return out


def save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def legend_right(fig, ax):
    """The runs' legend outside the panels, on the right (legible with 10+ runs, covering no data)."""
    handles, labels = ax.get_legend_handles_labels()
    width = 0.2 if handles else 0
    fig.tight_layout(rect=(0, 0, 1 - width, 1))
    if handles:
        fig.legend(handles, labels, title="run", loc="center right", fontsize="small",
                   ncols=1 if len(handles) <= 16 else 2)


def no_data(ax, text):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_hidden_error(eval_tables, out, title, styles):
    """eval_tables: {run: path of eval.parquet}; styles: run_styles of every run."""
    data = {run: read_table(p) for run, p in eval_tables.items()}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, modality in zip(axes, ("vision", "text")):
        for run, (df, _) in data.items():
            rows = df[(df.metric == "hidden_rel_mse") & (df.modality == modality)].sort_values("layer")
            color, ls, marker = styles[run]
            ax.plot(rows.layer.astype(int), rows.value, marker=marker, color=color, linestyle=ls, label=run)
        ax.set_title(f"{modality} positions")
        ax.set_xlabel("decoder layer")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].set_ylabel("relative MSE of layer output vs fp")
    if not data:
        no_data(axes[0], "no quantized runs")
    fig.suptitle(title)
    legend_right(fig, axes[0])
    save(fig, out)


def searched_alpha(df):
    """One row per layer and searched group: per-expert rows averaged, skipped groups (no α) dropped."""
    df = df[df["alpha"].notna()]
    if "expert" not in df or df["expert"].isna().all():
        return df
    return df.groupby(["layer", "group", "linears"], as_index=False, sort=False)["alpha"].mean()


def plot_alpha(search_tables, out, title, styles):
    """search_tables: {run: path of search.parquet}; styles: run_styles of every run; one panel per scale group (a
    per-expert group: the mean α over its experts; groups that did not apply are left out)."""
    data = {run: searched_alpha(pd.read_parquet(p)) for run, p in search_tables.items()}
    groups = []
    for df in data.values():
        groups += [g for g in df["group"].unique() if g not in groups]
    n = max(len(groups), 1)
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.6 * rows), squeeze=False, sharey=True)
    width = 0.08 * max(len(data) - 1, 0)  # runs side by side around each layer, so equal α stay visible
    for ax, group in zip(axes.flat, groups):
        for k, (run, df) in enumerate(data.items()):
            rows_g = df[df.group == group].sort_values("layer")
            color, ls, marker = styles[run]
            shift = -width / 2 + (width * k / (len(data) - 1) if len(data) > 1 else 0)
            ax.plot(rows_g.layer + shift, rows_g.alpha, marker=marker, color=color, linestyle=ls, label=run)
        linears = next(iter(df[df.group == group].linears for df in data.values() if (df.group == group).any()))
        ax.set_title(f"{group} →\n{linears.iloc[0].replace(',', ', ')}", fontsize="small")
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("chosen α (0 = RTN)")
        ax.set_ylim(-0.05, 1.0)
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    if not groups:
        axes.flat[0].set_visible(True)
        no_data(axes.flat[0], "no scale-search runs (RTN only)")
    fig.suptitle(title)
    legend_right(fig, axes.flat[0])
    save(fig, out)


def plot_metrics(summary, out, title, styles):
    """summary: the summary rows of one model and calibration set (plus the model's fp row); styles: run_styles.

    Horizontal bars, one per run (its name on the y axis, so 10+ runs stay legible), coloured by run.
    Every value axis starts at 0: caption NLL is drawn as its difference to the fp model's (ΔNLL; the
    fp value is in the panel title), so no axis is cut to make small differences visible.
    """
    panels = (("delta_nll_fp", "caption NLL − fp", "Δ nats per caption token"),
              ("kl", "KL(fp ‖ quantized)", "nats per caption token"),
              ("hidden_err_vision", "hidden error, vision positions", "relative MSE, mean over layers"),
              ("hidden_err_text", "hidden error, text positions", "relative MSE, mean over layers"))
    panels += tuple((col, f"{col.split('.')[1]} (lmms-eval)", col.split(".", 2)[2]) for col in summary.columns
                    if col.startswith(COLUMN_PREFIX) and not col.endswith(STATS) and summary[col].notna().any())
    summary = summary.reset_index(drop=True)
    colors = {run: style[0] for run, style in styles.items()}
    n = len(summary)
    n_rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(n_rows, 2, figsize=(12, (1.1 + 0.31 * max(n, 3)) * n_rows), sharey=True, squeeze=False)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fp = summary[summary.run == "fp"].caption_nll
    for ax, (col, label, unit) in zip(axes.flat, panels):
        values = summary[col].astype(float)
        y = range(n)[::-1]  # first row on top
        bars = ax.barh(list(y), values.fillna(0), color=[colors[r] for r in summary.run], height=0.7)
        ax.bar_label(bars, labels=["" if v != v else f"{v:.4g}" for v in values], fontsize="small", padding=3)
        ax.set_yticks(list(y), summary.run, fontsize="small")
        ax.axvline(0, color="0.2", linewidth=0.8)
        if col == "delta_nll_fp" and len(fp):
            label += f" (fp: {float(fp.iloc[0]):.4g})"
        ax.set_title(label, fontsize="medium")
        ax.set_xlabel(unit)
        ax.margins(x=0.25)  # room for the value labels, on either side of 0
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.grid(True, axis="x", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[r]) for r in summary.run]
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.legend(handles, [f"{r} ({m})" for r, m in zip(summary.run, summary.method)], title="run (method)",
               loc="center right", fontsize="small")
    save(fig, out)


def make_plots(model, calib, eval_tables, search_tables, methods, summary_path, outs):
    """The three figures of one model and calibration set. methods: {run: method} of every target run (their
    colours); outs: {"hidden_error", "alpha", "metrics"}: paths."""
    summary = pd.read_parquet(summary_path)
    eval_calib = summary[summary.model == model].eval_calib.dropna()
    where = f"{model}, calibration {calib}, eval on {eval_calib.iloc[0] if len(eval_calib) else '?'}"
    styles = run_styles(["fp", *methods], {"fp": "fp", **methods})
    plot_hidden_error(eval_tables, outs["hidden_error"], f"Per-layer output error vs fp ({where})", styles)
    plot_alpha(search_tables, outs["alpha"], f"Scale search: chosen α per layer and group ({model}, {calib})", styles)
    rows = summary[(summary.model == model) & ((summary.calib == calib) | (summary.run == "fp"))
                   & summary.run.isin(["fp", *eval_tables])]
    plot_metrics(rows, outs["metrics"], f"Held-out metrics by run ({where})", styles)
