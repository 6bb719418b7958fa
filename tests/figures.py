"""Reading a report figure (`plot_report`'s) back, for the plot tests and the
label conventions: its panels by their "(a) ..." titles."""

from __future__ import annotations


def panels(fig) -> dict[str, object]:
    """Panel letter -> axes, from the '(a) ...' titles."""
    found = {}
    for ax in fig.axes:
        title = ax.get_title(loc="left")
        if title.startswith("("):
            found[title[1]] = ax
    return found
