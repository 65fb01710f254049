"""The report's figures, drawn with matplotlib's Agg canvas (no display, no pyplot).

- `transfer_heatmap`: technique x architecture; colour = transfer ratio rho (clipped to
  [0, 1.2]; grey where a cell has no rho), text = verdict glyph and rho.
- `depth_profile`: one figure per technique that names its per-site value
  (`Technique.depth_value`, a key of its `details` rows) for rows that carry a depth (`layer`,
  the HookSpec's block index: 0 = input representation, i = after block i); one panel per
  task, one line per architecture: trained organisms solid, random-init controls dotted,
  each the mean over seeds of the best site at that depth, with a band for its 95%
  t-interval over seeds (the seed is the unit of replication, as in the verdict; no band
  from one seed). The reference architecture comes first, in the legend and in the
  drawing, with a thicker line. Rows a technique marks unscored (`trivial`, `scored=False`)
  are left out, as in its score. Techniques with no per-depth value (`depth_value` None:
  attribution, sae) and techniques this installation does not have get no figure.

Figures only read the store's DataFrames. `render` returns file name -> bytes in each
requested format (PNG for the page, SVG and PDF for papers), so the report can write them to
`figures/` and embed the PNGs in `index.html`. Output is deterministic: no dates, and SVG ids
from a fixed salt.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from archbench import verdict
from archbench.report_tables import arch_order, technique_class

RHO_MAX = 1.2
FORMATS = ("png", "svg", "pdf")
# metadata that would make two renderings of the same store differ (dates) or name the host
_METADATA = {"png": {"Software": None}, "svg": {"Date": None}, "pdf": {"CreationDate": None}}


def save(fig: Figure, formats=("png",)) -> dict[str, bytes]:
    """Format -> the figure's bytes in that format."""
    FigureCanvasAgg(fig)
    out = {}
    with rc_context({"svg.hashsalt": "archbench", "svg.fonttype": "path"}):
        for fmt in formats:
            buf = io.BytesIO()
            fig.savefig(buf, format=fmt, dpi=100, bbox_inches="tight", metadata=_METADATA[fmt])
            out[fmt] = buf.getvalue()
    return out


def _png(fig: Figure) -> bytes:
    return save(fig)["png"]


def transfer_heatmap(summary: pd.DataFrame, settings: verdict.Settings) -> bytes:
    return _png(transfer_heatmap_figure(summary, settings))


def transfer_heatmap_figure(summary: pd.DataFrame, settings: verdict.Settings) -> Figure:
    techs = sorted(summary.technique.unique())
    archs = arch_order(summary.arch.unique(), settings.reference)
    rho = np.full((len(techs), len(archs)), np.nan)
    labels = [["" for _ in archs] for _ in techs]
    for r in summary.itertuples():
        i, j = techs.index(r.technique), archs.index(r.arch)
        x = getattr(r, "rho", np.nan)
        rho[i, j] = x if x is not None else np.nan
        labels[i][j] = verdict.label(r.verdict, bool(getattr(r, "provisional", False))) + ("" if np.isnan(rho[i, j]) else f"\n{x:.2f}")
    fig = Figure(figsize=(1.0 + 0.85 * len(archs), 0.9 + 0.55 * len(techs)))
    ax = fig.add_subplot()
    cmap = _cmap()
    im = ax.imshow(np.clip(rho, 0, RHO_MAX), cmap=cmap, vmin=0, vmax=RHO_MAX, aspect="auto")
    for i in range(len(techs)):
        for j in range(len(archs)):
            dark = not np.isnan(rho[i, j]) and np.clip(rho[i, j], 0, RHO_MAX) < 0.45 * RHO_MAX
            ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=8,
                    color="white" if dark else "black", linespacing=0.9)
    ax.set_xticks(range(len(archs)), archs, rotation=35, ha="right")
    ax.set_yticks(range(len(techs)), techs)
    ax.set_title(f"Transfer ratio ρ vs {settings.reference} (grey: no ρ)", fontsize=10)
    cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, extend="max")
    cb.set_label("ρ (clipped)")
    legend = "   ".join(f"{g} {k}" for k, g in verdict.GLYPHS.items())
    fig.text(0.01, -0.02, legend, fontsize=8, ha="left", va="top")
    return fig


def _cmap():
    from matplotlib import colormaps

    return colormaps["viridis"].with_extremes(bad="#d9d9d9")


def depth_key(technique: str) -> str | None:
    """The `details` key the technique draws by depth (`Technique.depth_value`), or None."""
    cls = technique_class(technique)
    return None if cls is None else cls.depth_value


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def depth_frame(cells: pd.DataFrame, technique: str,
                confidence: float = verdict.Settings().confidence) -> pd.DataFrame | None:
    """(arch, task, control, layer, key, value, lo, hi, n_seeds): per depth, the mean over seeds
    of the best site at that depth, and its t-interval over seeds (NaN from one seed)."""
    key = depth_key(technique)
    if key is None:
        return None
    ok = cells[(cells.technique == technique) & (cells.status == "ok")]
    rows = []
    for r in ok.itertuples():
        for d in r.details or []:
            if not isinstance(d, dict) or d.get("layer") is None or d.get("trivial") or d.get("scored") is False:
                continue  # rows the technique itself leaves unscored (e.g. the readout's own input)
            if _number(d.get(key)):
                rows.append({"arch": r.arch, "task": r.task, "seed": r.seed, "control": bool(r.control),
                             "layer": int(d["layer"]), "value": float(d[key]), "key": key})
    if not rows:
        return None
    df = pd.DataFrame(rows)
    best = df.groupby(["arch", "task", "seed", "control", "layer", "key"]).value.max().reset_index()
    out = []
    for (arch, task, control, layer, key), g in best.groupby(["arch", "task", "control", "layer", "key"]):
        lo, hi = verdict.interval(g.value.to_numpy(), confidence)  # no band from one seed
        out.append({"arch": arch, "task": task, "control": control, "layer": layer, "key": key,
                    "value": float(g.value.mean()), "lo": lo, "hi": hi, "n_seeds": len(g)})
    return pd.DataFrame(out)


REFERENCE_WIDTH, WIDTH = 2.8, 1.4


def depth_profile(cells: pd.DataFrame, technique: str, reference: str) -> bytes | None:
    fig = depth_profile_figure(cells, technique, reference)
    return None if fig is None else _png(fig)


def depth_profile_figure(cells: pd.DataFrame, technique: str, reference: str) -> Figure | None:
    df = depth_frame(cells, technique)
    if df is None:
        return None
    tasks = sorted(df.task.unique())
    archs = arch_order(df.arch.unique(), reference)  # the reference first: drawn first, listed first
    colours = {a: f"C{i % 10}" for i, a in enumerate(archs)}
    ncols = min(3, len(tasks))
    nrows = -(-len(tasks) // ncols)
    fig = Figure(figsize=(0.6 + 3.2 * ncols, 0.4 + 2.6 * nrows))
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    for ax in axes[len(tasks):]:
        ax.set_visible(False)
    axes = axes[:len(tasks)]
    for ax, task in zip(axes, tasks):
        for arch in archs:
            ref = arch == reference
            width = REFERENCE_WIDTH if ref else WIDTH
            for control, style in ((False, "-"), (True, ":")):
                g = df[(df.task == task) & (df.arch == arch) & (df.control == control)].sort_values("layer")
                if not len(g):
                    continue
                band = g[g.lo.notna()]
                if len(band):
                    ax.fill_between(band.layer, band.lo, band.hi, color=colours[arch], linewidth=0,
                                    alpha=(0.10 if control else 0.22) if ref else (0.06 if control else 0.15))
                label = None if control else (f"{arch} (reference)" if ref else arch)
                ax.plot(g.layer, g.value, style, marker="o" if not control else None,
                        markersize=4 if ref else 3, linewidth=width, color=colours[arch],
                        alpha=1.0 if not control else 0.6, label=label)
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("depth (layer)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    for ax in axes[::ncols]:
        ax.set_ylabel(" / ".join(sorted(df.key.unique())))
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    order = sorted(range(len(labels)), key=lambda k: archs.index(labels[k].removesuffix(" (reference)")))
    fig.legend([handles[k] for k in order], [labels[k] for k in order], loc="center left",
               bbox_to_anchor=(1.0, 0.5), fontsize=8,
               title="solid: trained\ndotted: control\nband: 95% CI over seeds", title_fontsize=8)
    fig.suptitle(f"{technique}: best site per depth (mean over seeds)", fontsize=11)
    fig.tight_layout()
    return fig


def render(cells: pd.DataFrame, summary: pd.DataFrame, settings: verdict.Settings,
           formats=("png",)) -> dict[str, bytes]:
    """File name -> bytes for every figure the store supports, in each of `formats`
    (a subset of FORMATS): transfer_matrix.png, depth_probe.svg, ..."""
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown figure format(s) {', '.join(sorted(unknown))}; choose from {', '.join(FORMATS)}")
    figures = {}
    if len(summary):
        figures["transfer_matrix"] = transfer_heatmap_figure(summary, settings)
    for tech in sorted(cells.technique.unique()):
        fig = depth_profile_figure(cells, tech, settings.reference)
        if fig is not None:
            figures[f"depth_{tech}"] = fig
    return {f"{stem}.{fmt}": data for stem, fig in figures.items() for fmt, data in save(fig, formats).items()}
