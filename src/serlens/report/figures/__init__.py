"""The workflow's figures: one function per figure family, each returning a matplotlib Figure.

Inputs are the tidy tables of :mod:`serlens.report.tables` and :mod:`serlens.report.aggregate`
(``results/tables/*.tsv``) and the runs' ``history*.tsv``; :func:`save` writes a figure as
PNG and SVG. Conventions, so that the figures read alike:

* x = relative depth ``ℓ / L`` wherever a quantity is per layer (0 = the input embedding,
  1 = the last encoder layer), so models of different size share an axis.
* One colour per method (frozen heads grey/black, LoRA ranks from a sequential palette); the
  line is the mean over folds and the band ± one standard deviation (sample std, ddof 1).
* Axis limits are left to matplotlib: nothing is hand-clipped. Colour scales of heat maps
  span the data (and at least their natural range, e.g. 0..1 for recall).
* Matplotlib's Agg backend (no display needed), without pyplot: the figure functions and
  :func:`save` may be called from several threads of one process (see :mod:`.style`).

One module per figure family: :mod:`.performance` (performance, confusion), :mod:`.training`,
:mod:`.contributions` (per model, across models), :mod:`.lens`, :mod:`.probing`,
:mod:`.spectra`, :mod:`.ab_dynamics`, :mod:`.ab_cka`, :mod:`.cka` and :mod:`.rulegraph` (also the snakemake
helpers); shared helpers in :mod:`.style`. Every name is re-exported here.
"""

from __future__ import annotations

from .ab_cka import ab_cka_figure
from .ab_dynamics import ab_dynamics_figure
from .cka import CKA_KINDS as CKA_KINDS
from .cka import cka_figure
from .contributions import contributions_depth_figure, contributions_figure
from .lens import logit_lens_figure
from .performance import confusion_figure, performance_figure
from .probing import probing_figure
from .rulegraph import EDGE as EDGE
from .rulegraph import NODE as NODE
from .rulegraph import build_report, rulegraph_dot, rulegraph_figure
from .rulegraph import layered_layout as layered_layout
from .rulegraph import parse_rulegraph as parse_rulegraph
from .rulegraph import snakemake_command as snakemake_command
from .spectra import spectra_figure
from .style import COMPONENT_TITLES as COMPONENT_TITLES
from .style import DEPTH_LABEL as DEPTH_LABEL
from .style import DPI as DPI
from .style import FROZEN_COLOR as FROZEN_COLOR
from .style import LINESTYLES as LINESTYLES
from .style import LOCK as LOCK
from .style import RANK_COLORS as RANK_COLORS
from .style import RC as RC
from .style import WSUM_COLOR as WSUM_COLOR
from .style import annotate_cells as annotate_cells
from .style import band as band
from .style import by_layer as by_layer
from .style import chance_line as chance_line
from .style import collect_legend as collect_legend
from .style import empty_panel as empty_panel
from .style import figure_style as figure_style
from .style import fold_note as fold_note
from .style import legend_below as legend_below
from .style import lora_methods as lora_methods
from .style import method_colors as method_colors
from .style import method_label as method_label
from .style import method_order as method_order
from .style import model_title as model_title
from .style import module_type as module_type
from .style import n_layers as n_layers
from .style import new_figure as new_figure
from .style import new_subplots as new_subplots
from .style import plain_log_axis as plain_log_axis
from .style import rank_of as rank_of
from .style import rows as rows
from .style import save
from .style import spread_note as spread_note
from .training import load_histories, training_curves_figure
from .training import selected_epoch as selected_epoch

__all__ = [
    "ab_cka_figure",
    "ab_dynamics_figure",
    "cka_figure",
    "confusion_figure",
    "contributions_depth_figure",
    "contributions_figure",
    "load_histories",
    "logit_lens_figure",
    "performance_figure",
    "probing_figure",
    "rulegraph_figure",
    "build_report",
    "rulegraph_dot",
    "save",
    "spectra_figure",
    "training_curves_figure",
]
