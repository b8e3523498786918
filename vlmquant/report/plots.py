"""Report figures of one (model, calibration set): matplotlib, Agg backend, PNG.

- hidden_error.png: per-layer relative MSE of the decoder-layer outputs vs fp, vision and text
  positions side by side, one line per run.
- alpha.png: the α the search chose per layer, one panel per scale group, one line per run.
- metrics.png: caption NLL, KL, mean hidden error (vision, text) per run, fp included, and each lmms-eval
  score of the summary (e.g. the organism's task accuracy) when lmms_eval is enabled.
"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from vlmquant.eval.lmms_results import COLUMN_PREFIX  # noqa: E402
from vlmquant.eval.table import read_table  # noqa: E402
from vlmquant.io.atomic import atomic_path  # noqa: E402

METHOD_COLORS = {"fp": "#7f7f7f", "rtn": "#d62728", "awq": "#1f77b4", "mbq": "#2ca02c",
                 "smoothquant": "#9467bd"}
STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P")


def run_styles(runs, methods):
    """A (color, linestyle, marker) per run: color by method; line style and marker tell runs apart."""
    seen, out = {}, {}
    for n, run in enumerate(runs):
        m = methods.get(run, "")
        k = seen.get(m, 0)
        seen[m] = k + 1
        out[run] = (METHOD_COLORS.get(m, f"C{n % 10}"), STYLES[k % len(STYLES)], MARKERS[n % len(MARKERS)])
    return out


def save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def no_data(ax, text):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_hidden_error(eval_tables, out, title):
    """eval_tables: {run: path of eval.parquet}."""
    data = {run: read_table(p) for run, p in eval_tables.items()}
    styles = run_styles(list(data), {r: m.get("method") for r, (_, m) in data.items()})
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
    if data:
        axes[1].legend(title="run", fontsize="small")
    else:
        no_data(axes[0], "no quantized runs")
    fig.suptitle(title)
    fig.tight_layout()
    save(fig, out)


def plot_alpha(search_tables, methods, out, title):
    """search_tables: {run: path of search.parquet}; methods: {run: method}; one panel per scale group."""
    data = {run: pd.read_parquet(p) for run, p in search_tables.items()}
    groups = []
    for df in data.values():
        groups += [g for g in df["group"].unique() if g not in groups]
    n = max(len(groups), 1)
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.6 * rows), squeeze=False, sharey=True)
    styles = run_styles(list(data), methods)
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
    if groups:
        axes.flat[0].legend(title="run", fontsize="small")
    else:
        axes.flat[0].set_visible(True)
        no_data(axes.flat[0], "no scale-search runs (RTN only)")
    fig.suptitle(title)
    fig.tight_layout()
    save(fig, out)


def plot_metrics(summary, out, title):
    """summary: the summary rows of one model and calibration set (plus the model's fp row)."""
    panels = (("caption_nll", "caption NLL", "nats per caption token"),
              ("kl", "KL(fp ‖ quantized)", "nats per caption token"),
              ("hidden_err_vision", "hidden error, vision positions", "relative MSE, mean over layers"),
              ("hidden_err_text", "hidden error, text positions", "relative MSE, mean over layers"))
    panels += tuple((col, f"{col.split('.')[1]} (lmms-eval)", col.split(".", 2)[2]) for col in summary.columns
                    if col.startswith(COLUMN_PREFIX) and summary[col].notna().any())
    summary = summary.reset_index(drop=True)
    colors = [METHOD_COLORS.get(m, "C0") for m in summary.method]
    n_rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(n_rows, 2, figsize=(10, 3.75 * n_rows), squeeze=False)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    for ax, (col, label, unit) in zip(axes.flat, panels):
        values = summary[col].astype(float)
        bars = ax.bar(range(len(summary)), values, color=colors)
        ax.bar_label(bars, labels=[f"{v:.5g}" for v in values], fontsize="x-small", padding=2)
        ax.set_xticks(range(len(summary)), summary.run, rotation=30, ha="right")
        ax.set_title(label, fontsize="medium")
        ax.set_xlabel("run")
        ax.set_ylabel(unit)
        if col == "caption_nll" and len(values.dropna()):
            lo, hi = values.min(), values.max()
            pad = max((hi - lo) * 0.5, 1e-3 * abs(hi))
            ax.set_ylim(lo - pad, hi + pad)  # differences are small next to the NLL itself
        ax.margins(y=0.15)
        ax.grid(True, axis="y", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=METHOD_COLORS.get(m, "C0")) for m in dict.fromkeys(summary.method)]
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    fig.legend(handles, list(dict.fromkeys(summary.method)), title="method", loc="center right", fontsize="small")
    save(fig, out)


def make_plots(model, calib, eval_tables, search_tables, methods, summary_path, outs):
    """The three figures of one model and calibration set. outs: {"hidden_error", "alpha", "metrics"}: paths."""
    summary = pd.read_parquet(summary_path)
    eval_calib = summary[summary.model == model].eval_calib.dropna()
    where = f"{model}, calibration {calib}, eval on {eval_calib.iloc[0] if len(eval_calib) else '?'}"
    plot_hidden_error(eval_tables, outs["hidden_error"], f"Per-layer output error vs fp ({where})")
    plot_alpha(search_tables, methods, outs["alpha"], f"Scale search: chosen α per layer and group ({model}, {calib})")
    rows = summary[(summary.model == model) & ((summary.calib == calib) | (summary.run == "fp"))
                   & summary.run.isin(["fp", *eval_tables])]
    plot_metrics(rows, outs["metrics"], f"Held-out metrics by run ({where})")
