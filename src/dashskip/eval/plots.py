"""Figures of a sweep: quality against measured speedup per method, and DASH's per-layer states (paper fig. 4)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from dashskip.core.states import registered  # noqa: E402
from dashskip.data import load_text  # noqa: E402
from dashskip.eval.evaluation import perplexity_windows  # noqa: E402


def pareto_plot(cells, path: Path, model: str) -> None:
    """One panel per task: the primary metric against the measured compute ratio, a line per method."""
    tasks = list(dict.fromkeys(c.task for c in cells))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        full = next(c for c in cells if c.task == task and c.method == "full")
        scale = 1 if full.metric == "ppl" or full.metric.startswith("rouge") else 100
        ax.axhline(full.value * scale, color="black", ls="--", lw=0.8)
        ax.errorbar([1.0], [full.value * scale], [full.se * scale], fmt="k*", ms=10, label="full")
        for method in dict.fromkeys(c.method for c in cells if c.method != "full"):
            pts = sorted((c for c in cells if c.task == task and c.method == method and not c.unreachable),
                         key=lambda c: c.compute_ratio)  # fmt: skip
            if pts:
                ax.errorbar([c.compute_ratio for c in pts], [c.value * scale for c in pts],
                            [c.se * scale for c in pts], marker="o", ms=4, capsize=2, label=method)  # fmt: skip
        ax.set_xlabel("measured compute ratio")
        ax.set_ylabel(full.metric + (" (%)" if scale == 100 else ""))
        if full.metric == "ppl":
            ax.set_yscale("log")
        ax.set_title(f"{task} (n={full.n})")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{model}: quality vs speedup (error bars: SE)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def speed_quality_plot(points: dict[str, tuple[float, float, float]], path: Path, title: str) -> None:
    """WikiText-2 perplexity (± SE) against decode tokens/s, one labelled point per configuration
    ({name: (decode tok/s, ppl, se)}); llama.cpp's points in another colour."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (name, (speed, ppl, se)) in enumerate(points.items()):
        colour = "tab:orange" if name.startswith("llama.cpp") else "tab:blue"
        ax.errorbar([speed], [ppl], [se], fmt="o", color=colour, ms=5, capsize=2)
        offset = (4, 4) if i % 2 == 0 else (4, -10)  # neighbours' labels above and below: they do not overlap
        ax.annotate(name, (speed, ppl), textcoords="offset points", xytext=offset, fontsize=7)
    ax.set_xlabel("decode tokens/s (batch 1)")
    ax.set_ylabel("WikiText-2 perplexity (lower is better)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def state_map_plot(dm, deciders: dict, cosine: list[float], path: Path, data_dir=None, tokens: int = 48) -> None:
    """The states of one WikiText-2 sample at each operating point (tokens x layers), beside each layer's
    input/output cosine similarity: where DASH skips should follow where layers change the stream least."""
    ids = perplexity_windows(dm.tokenizer, load_text("wikitext2", data_dir), tokens, 1)
    maps = {t: dm.engine.step(ids, dm.engine.new_session(*ids.shape), d).states[0] for t, d in deciders.items()}
    states_known = registered()  # cheapest first: red (skip) ... blue (full)
    palette = plt.get_cmap("RdYlBu", max(len(states_known), 2))
    color = {s.code: palette(k) for k, s in enumerate(states_known)}
    top = max(color)
    colors = ListedColormap([color.get(c, (1, 1, 1, 1)) for c in range(top + 1)])
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(3.6 * (len(maps) + 1), 4.2), sharey=True)
    for ax, (target, states) in zip(axes, maps.items(), strict=False):
        ax.imshow(states.T.float().numpy(), aspect="auto", cmap=colors, vmin=-0.5, vmax=top + 0.5, origin="lower")
        ratio = dm.costs.compute_ratio(states)
        ax.set_title(f"{target}x requested ({ratio:.2f}x measured)", fontsize=9)
        ax.set_xlabel("token")
    axes[0].set_ylabel("layer")
    axes[-1].barh(range(len(cosine)), cosine, color="gray")
    axes[-1].set_xlim(min(0.0, min(cosine)), 1.0)
    axes[-1].set_title("cos(input, output) per layer", fontsize=9)
    handles = [Patch(color=color[s.code], label=s.name) for s in states_known]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def perplexity_lines(
    rows: list[dict],
    x: str,
    path: Path,
    xlabel: str,
    title: str,
    full_ppl: float | None = None,
    log: bool = False,
    cap: float | None = None,
) -> None:
    """Perplexity (± SE) against `x`, a line per row name (rows: dicts with name, x, ppl, ppl_se); the full model's
    perplexity as a dotted line where given. With `cap`, the axis ends there and a collapsed row is a labelled mark
    at the top edge, so one collapse does not flatten the differences that matter into one line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["name"] for r in rows):
        points = sorted((r for r in rows if r["name"] == name), key=lambda r: r[x])
        ax.errorbar([r[x] for r in points], [r["ppl"] for r in points], [r["ppl_se"] for r in points],
                    marker="*" if name == "full" else "o", ms=5, capsize=2, label=name)  # fmt: skip
    if full_ppl is not None:
        ax.axhline(full_ppl, color="grey", lw=0.8, ls=":", label="full model")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("WikiText-2 test perplexity")
    if log:
        ax.set_yscale("log")
    if cap is not None and any(r["ppl"] > cap for r in rows):
        low = min(r["ppl"] - r["ppl_se"] for r in rows)
        ax.set_ylim(low - 0.05 * (cap - low), cap)
        for r in rows:
            if r["ppl"] > cap:
                ax.annotate(f"{r['ppl']:.3g}", (r[x], cap), xytext=(0, -12), textcoords="offset points",
                            ha="center", fontsize=7, arrowprops={"arrowstyle": "->"})  # fmt: skip
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
