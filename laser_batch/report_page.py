"""The report as one self-contained HTML page: numbers in tables, plots drawn by matplotlib as inline PNGs. No torch.

Nothing on the page is fetched: every plot is a `data:` URI and the style sits in the page, so the file can be
mailed, attached to a ticket or opened on a machine without network. Each plot is an `<img class="plot">` of a
fixed size (what the browser test measures).
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np
from matplotlib.figure import Figure

from laser_batch.run_report import epoch_labels

WIDTH, HEIGHT, DPI = 6.4, 3.6, 100  # inches, dots per inch: 640 x 360 pixels per plot
STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1400px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.5em; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { padding: 2px 12px; text-align: left; }
tr:nth-child(even) { background: #f2f2f2; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; } img.plot { border: 1px solid #ccc; }
.warn { color: #a00; font-weight: bold; }
"""


def recs_page(report: dict, series: dict) -> str:
    """The page of a `score` output's report (`recs_report.recs_report`)."""
    users, throughput, previous = report["users"], report["throughput"], report["previous"]
    rows = [("users in", users["in"]), ("users scored", users["scored"]),
            *((f"rejected: {reason}", n) for reason, n in users["rejected"].items()),
            ("recommendations", report["recommendations"]), ("K", report["top_k"]),
            ("users short of K", f"{report['short_of_k']['users']} ({report['short_of_k']['share']:.2%})"),
            ("catalogue coverage@K", f"{report['coverage']:.4f} ({report['distinct_items']} of "
                                     f"{report['catalogue_items']} items)"),
            ("Gini index of recommended items", f"{report['gini']:.4f}")]
    if report["popularity"]:
        p = report["popularity"]
        rows.append(("mean popularity: recommended / catalogue",
                     f"{p['recommended_mean']:.2f} / {p['catalogue_mean']:.2f} (lift {p['lift']:.2f})"))
    rows += [("throughput", f"{throughput['users_per_second']} users/s, {throughput['tokens_per_second']} tokens/s "
                            f"on {throughput['provider']}, {throughput['seconds']} s")]
    plots = [_users_plot(users), _concentration_plot(series["item_counts"], report),
             _histogram_plot(series["scores"], "score distribution", "score", "recommendations"),
             _items_per_user_plot(series["items_per_user"], report["top_k"])]
    if report["popularity"]:
        plots.insert(2, _popularity_plot(series["catalogue_popularity"], series["recommended_popularity"]))
    sections = [("Tonight", _table(rows), plots)]
    if previous:
        compared = [("previous output", previous["dir"]), ("users in both", previous["users_compared"]),
                    ("users new / gone", f"{previous['users_new']} / {previous['users_gone']}"),
                    ("Jaccard@K mean / median", _pair(previous["jaccard"], "mean", "p50")),
                    ("items new / dropped / kept",
                     f"{previous['items_new']} / {previous['items_dropped']} / {previous['items_kept']}"),
                    ("most recommended new items", _top(previous["items_new_top"])),
                    ("most recommended dropped items", _top(previous["items_dropped_top"]))]
        sections.append(("Against the previous output", _table(compared),
                         [_histogram_plot(series.get("jaccard", np.empty(0)), "per-user Jaccard@K with the previous "
                                          "output", "Jaccard@K", "users", value_range=(0.0, 1.0), bins=20),
                          _items_changed_plot(previous)]))
    warning = "" if report["committed"] else "<p class='warn'>No _SUCCESS: this output is not committed.</p>"
    return _page(f"laser-batch report: {report['recs_dir']}", warning, sections)


def run_page(report: dict) -> str:
    """The page of a training run's report (`run_report.run_report`): loss and validation metrics per epoch."""
    sections = []
    for model, data in report["models"].items():
        records = data["epochs"]
        rows = [("epochs", len(records)), *((f"best {name}", f"{max(r.get(name, -np.inf) for r in records):.4f}")
                                            for name in data["metrics"])]
        sections.append((model, _table(rows), [_curves_plot(model, records, data["metrics"])]))
    return _page(f"laser-batch report: {report['run_dir']}", "", sections)


def _page(title: str, preface: str, sections: list[tuple[str, str, list[str]]]) -> str:
    body = "".join(f"<h2>{html.escape(name)}</h2>{table}<div class='plots'>{''.join(plots)}</div>"
                   for name, table, plots in sections)
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{preface}{body}</body></html>\n")


def _table(rows: list[tuple[str, object]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td class='n'>{html.escape(str(v))}</td></tr>"
                    for k, v in rows)
    return f"<table>{cells}</table>"


def _pair(distribution: dict, a: str, b: str) -> str:
    return f"{distribution[a]:.4f} / {distribution[b]:.4f}" if distribution.get("count") else "no users in both"


def _top(items: list) -> str:
    return ", ".join(f"{item} ({n})" for item, n in items) or "none"


def _figure() -> tuple[Figure, object]:
    figure = Figure(figsize=(WIDTH, HEIGHT), dpi=DPI, layout="constrained")
    return figure, figure.add_subplot()


def _img(figure: Figure, alt: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (f"<img class='plot' alt='{html.escape(alt)}' width='{int(WIDTH * DPI)}' height='{int(HEIGHT * DPI)}' "
            f"src='data:image/png;base64,{data}'>")


def _users_plot(users: dict) -> str:
    figure, ax = _figure()
    labels = ["scored", *(f"rejected: {r}" for r in users["rejected"])]
    values = [users["scored"] or 0, *users["rejected"].values()]
    bars = ax.barh(labels[::-1], values[::-1], color=["#c44e52"] * (len(values) - 1) + ["#4c72b0"])
    ax.bar_label(bars, padding=3)
    ax.set_xlabel("users")
    ax.set_title("users scored and rejected by reason")
    return _img(figure, "users scored and rejected")


def _concentration_plot(item_counts: np.ndarray, report: dict) -> str:
    """Lorenz curve: the share of recommendations that the least recommended x% of the catalogue gets."""
    figure, ax = _figure()
    counts = np.sort(np.asarray(item_counts, dtype=np.float64))
    share = np.concatenate([[0.0], np.cumsum(counts) / max(counts.sum(), 1.0)])
    items = np.linspace(0.0, 1.0, len(share))
    ax.plot(items, share, color="#4c72b0", label="recommendations")
    ax.plot([0, 1], [0, 1], color="#999999", linestyle="--", label="every item equally often")
    ax.fill_between(items, share, items, color="#4c72b0", alpha=0.15)
    ax.set_xlabel("share of catalogue items (least recommended first)")
    ax.set_ylabel("share of recommendations")
    ax.set_title(f"concentration: Gini {report['gini']:.3f}, coverage@K {report['coverage']:.3f}")
    ax.legend(loc="upper left")
    return _img(figure, "concentration of recommendations over the catalogue")


def _popularity_plot(catalogue: np.ndarray, recommended: np.ndarray) -> str:
    figure, ax = _figure()
    top = max(float(np.max(catalogue, initial=0)), float(np.max(recommended, initial=0)), 1.0)
    bins = np.unique(np.round(np.geomspace(1, top + 1, 30)))
    for values, label, color in ((catalogue, "catalogue items", "#999999"),
                                 (recommended, "recommended items", "#dd8452")):
        ax.hist(np.asarray(values) + 1, bins=bins, density=True, alpha=0.5, color=color, label=label)
        ax.axvline(float(np.mean(values)) + 1 if len(values) else 1, color=color, linestyle="--")
    ax.set_xscale("log")
    ax.set_xlabel("training interactions + 1 (dashed: means)")
    ax.set_ylabel("density")
    ax.set_title("popularity of recommended items against the catalogue")
    ax.legend(loc="upper right")
    return _img(figure, "popularity of recommended items")


def _histogram_plot(values: np.ndarray, title: str, xlabel: str, ylabel: str, *,
                    value_range: tuple[float, float] | None = None, bins: int = 40) -> str:
    figure, ax = _figure()
    if len(values):
        ax.hist(values, bins=bins, range=value_range, color="#4c72b0")
    else:
        ax.text(0.5, 0.5, "nothing to draw", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _img(figure, title)


def _items_per_user_plot(per_user: np.ndarray, top_k: int) -> str:
    figure, ax = _figure()
    lengths, users = np.unique(per_user, return_counts=True)
    ax.bar(lengths, users, color=np.where(lengths < top_k, "#c44e52", "#4c72b0"))
    ax.set_xlabel(f"items per user (red: short of K = {top_k})")
    ax.set_ylabel("users")
    ax.set_yscale("log")
    ax.set_title("users short of K")
    return _img(figure, "items per user")


def _items_changed_plot(previous: dict) -> str:
    figure, ax = _figure()
    labels, values = ["new", "dropped", "kept"], [previous["items_new"], previous["items_dropped"],
                                                  previous["items_kept"]]
    bars = ax.bar(labels, values, color=["#55a868", "#c44e52", "#999999"])
    ax.bar_label(bars)
    ax.set_ylabel("distinct items")
    ax.set_title("items in the output: new, dropped, kept")
    return _img(figure, "items new and dropped")


def _curves_plot(model: str, records: list[dict], metrics: list[str]) -> str:
    figure = Figure(figsize=(WIDTH, HEIGHT), dpi=DPI, layout="constrained")
    loss_ax, metric_ax = figure.subplots(1, 2)
    labels = epoch_labels(records)
    x = np.arange(len(records))
    trained = [i for i, r in enumerate(records) if "loss" in r]
    loss_ax.plot(x[trained], [records[i]["loss"] for i in trained], marker="o", color="#c44e52")
    loss_ax.set_title(f"{model}: training loss")
    for name in metrics:
        at = [i for i, r in enumerate(records) if name in r]
        metric_ax.plot(x[at], [records[i][name] for i in at], marker=".", label=name)
    metric_ax.set_title(f"{model}: validation")
    metric_ax.legend(fontsize="small", loc="lower right")
    step = max(1, len(x) // 8)
    for ax in (loss_ax, metric_ax):
        ax.set_xticks(x[::step], labels[::step])
        ax.set_xlabel("epoch")
    return _img(figure, f"{model} training curves")
