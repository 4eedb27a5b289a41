"""The matplotlib set-up shared by every PNG the library draws (matplotlib is optional:
``pip install 'longctx[plot]'``)."""

from __future__ import annotations

import warnings
from pathlib import Path


def pyplot(what: str = "plot"):
    """``matplotlib.pyplot`` on the file-only Agg backend; without matplotlib, warn that
    ``what`` was not drawn and return None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn(f"matplotlib is not installed, so no {what} was drawn; pip install 'longctx[plot]'")
        return None
    return plt


def save_figure(fig, path) -> Path:
    """Lay out ``fig``, write it as a PNG at 100 dpi, close it and return ``path``."""
    import matplotlib.pyplot as plt

    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")  # legends placed beside the axes stay in the image
    plt.close(fig)
    return Path(path)
