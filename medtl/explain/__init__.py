"""Stage 6: explanation. One verb (`explain`), trust checks, overlays, NIfTI export, the HTML report."""

from medtl.explain.attribution import METHODS, ConvergenceWarning, explain
from medtl.explain.export import save_nifti
from medtl.explain.faithfulness import deletion_insertion, summarize_faithfulness
from medtl.explain.overlay import montage_png, overlay_png, panel_png
from medtl.explain.report import write_report
from medtl.explain.sanity import mask_agreement, randomization_check

__all__ = ["METHODS", "ConvergenceWarning", "deletion_insertion", "explain", "mask_agreement",
           "montage_png", "overlay_png", "panel_png", "randomization_check", "save_nifti",
           "summarize_faithfulness", "write_report"]
