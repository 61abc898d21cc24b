"""Line plots of benchmark figures against request rate, written as one PNG."""

from __future__ import annotations

# A panel: (title, y-axis label, {line label: (rates, values)}).
Panel = tuple[str, str, dict[str, tuple[list[float], list]]]


def plot_grid(rows: list[list[Panel]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), len(rows[0]), figsize=(5 * len(rows[0]), 4.3 * len(rows)), squeeze=False)
    for ax_row, panels in zip(axes, rows):
        for ax, (panel_title, ylabel, lines) in zip(ax_row, panels):
            for label, (rates, values) in lines.items():
                ax.plot(rates, values, marker="o", label=label)
            ax.set_xlabel("request rate (req/s)")
            ax.set_ylabel(ylabel)
            ax.set_title(panel_title)
            ax.grid(True, alpha=0.3)
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
