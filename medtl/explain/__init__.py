"""Stage 6: explanation. One verb (`explain`), sanity checks, overlays and the HTML report."""

from medtl.explain.attribution import METHODS, explain
from medtl.explain.overlay import overlay_png, panel_png
from medtl.explain.report import write_report
from medtl.explain.sanity import mask_agreement, randomization_check

__all__ = ["METHODS", "explain", "mask_agreement", "overlay_png", "panel_png", "randomization_check",
           "write_report"]
