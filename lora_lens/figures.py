"""The package's one figure convention, used by every room that draws.

Every figure function draws into ``ax=`` when given (a sequence of axes where a figure has several panels, as its
docstring says) or into a new figure, and returns the figure. Nothing sets a global matplotlib theme: a figure
function is decorated with :func:`styled`, which draws under :data:`FIGURE_STYLE` and restores the rc settings
afterwards, and :func:`subplots` makes axes in that style for a figure that a notebook composes itself.

Example:
    >>> fig, axes = subplots(1, 2, figsize=(8, 3))
    >>> len(axes)
    2
"""

from __future__ import annotations

import functools

import matplotlib.pyplot as plt
import seaborn as sns
from cycler import cycler

__all__ = ["FIGURE_STYLE", "styled", "subplots"]

FIGURE_STYLE = {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook"),
                "axes.prop_cycle": cycler(color=sns.color_palette("deep"))}
"""The matplotlib settings the package's figures are drawn with (``plt.rc_context(FIGURE_STYLE)``): seaborn's
whitegrid style, notebook context and deep palette, what ``sns.set_theme(style="whitegrid")`` would set globally."""


def styled(draw):
    """Decorate a figure function so that it draws under :data:`FIGURE_STYLE` (rc settings restored afterwards)."""
    @functools.wraps(draw)
    def drawn(*args, **kwargs):
        with plt.rc_context(FIGURE_STYLE):
            return draw(*args, **kwargs)
    return drawn


@styled
def subplots(*args, **kwargs):
    """``plt.subplots`` in the package's figure style: axes to pass as ``ax=`` to several figure functions."""
    return plt.subplots(*args, **kwargs)
