"""The findings section's figures (archbench/findings.py), drawn from the store alone.

- `findings_nanda`: the transformer's modadd embedding spectrum, frequencies ranked by power
  share, per seed: trained (solid) against its random-init control (dotted); the dashed line
  is the even spread a spectrum with no key frequencies has.
- `findings_tracing`: causal tracing's indirect effect (normalised by the total effect, mean
  over seeds) per block × position on facts_long, one panel per family (transformer, Mamba),
  as in Meng et al. 2022's figure 1.
- `findings_zoology`: mqar held-out accuracy against the number of key-value pairs, one line
  per family (mean over seeds, seeds as points).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from archbench import findings


def _ok(cells: pd.DataFrame, technique: str, arch: str, task: str) -> pd.DataFrame:
    return cells[(cells.technique == technique) & (cells.arch == arch) & (cells.task == task) & (cells.status == "ok")]


def nanda(cells: pd.DataFrame) -> Figure | None:
    rows = _ok(cells, "fourier", "transformer", "modadd")
    if rows.empty:
        return None
    fig = Figure(figsize=(4.2, 3.0))
    ax = fig.add_subplot(1, 1, 1)
    n = 0
    for r in rows.sort_values(["control", "seed"]).itertuples():
        shares = np.sort([d["share_embed"] for d in r.details])[::-1]  # (n_freq,)
        n = len(shares)
        ax.plot(np.arange(1, n + 1), shares, linestyle=":" if r.control else "-", marker="o", markersize=2,
                color="grey" if r.control else "C0", label=None)
    ax.axhline(1 / max(n, 1), color="black", linestyle="--", linewidth=1)
    ax.plot([], [], color="C0", label="trained (per seed)")
    ax.plot([], [], color="grey", linestyle=":", label="random-init control")
    ax.set_xlabel("frequency rank")
    ax.set_ylabel("share of embedding power")
    ax.set_title("transformer · modadd: Fourier spectrum", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def tracing(cells: pd.DataFrame) -> Figure | None:
    panels = []
    for arch in (findings.DEEP, findings.DEEP_MAMBA):
        rows = _ok(cells, "causal_tracing", arch, "facts_long")
        rows = rows[~rows.control]
        if rows.empty:
            continue
        grid = pd.DataFrame([d for details in rows.details for d in details
                             if d.get("role") == "stream" and d.get("layer")])
        if grid.empty:
            continue
        mean = grid.pivot_table(index="layer", columns="position", values="ie", aggfunc="mean")  # (layers, T)
        kinds = grid.drop_duplicates("position").set_index("position").position_kind.reindex(mean.columns)
        panels.append((arch, mean, kinds))
    if not panels:
        return None
    fig = Figure(figsize=(4.0 * len(panels), 3.2))
    for i, (arch, mean, kinds) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        im = ax.imshow(mean.to_numpy(dtype=float), aspect="auto", origin="lower", cmap="Purples", vmin=0, vmax=1)
        ax.set_yticks(range(len(mean.index)), [str(x) for x in mean.index])
        ax.set_xticks(range(len(mean.columns)), [k.replace("subject_", "s.") for k in kinds], rotation=45, fontsize=7)
        ax.set_ylabel("block")
        ax.set_title(f"{arch} · facts_long", fontsize=9)
        fig.colorbar(im, ax=ax, label="IE / TE")
    fig.subplots_adjust(wspace=0.45)
    return fig


def zoology(organisms: pd.DataFrame) -> Figure | None:
    acc = findings.mqar_accuracy(organisms)
    if acc.empty:
        return None
    fig = Figure(figsize=(4.2, 3.0))
    ax = fig.add_subplot(1, 1, 1)
    for i, (arch, g) in enumerate(acc.groupby("arch")):
        mean = g.groupby("pairs").accuracy.mean()
        ax.plot(mean.index, mean.values, marker="o", color=f"C{i}", label=arch,
                linewidth=2.5 if arch == findings.MQAR_ATTENTION else 1.2)
        ax.scatter(g.pairs, g.accuracy, s=8, color=f"C{i}", alpha=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(findings.MQAR_PAIRS), [str(p) for p in findings.MQAR_PAIRS])
    ax.set_xlabel("key-value pairs")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("mqar, d_model 64", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def render(cells: pd.DataFrame, organisms: pd.DataFrame) -> dict[str, Figure]:
    drawn = {"findings_nanda": nanda(cells), "findings_tracing": tracing(cells), "findings_zoology": zoology(organisms)}
    return {name: fig for name, fig in drawn.items() if fig is not None}
