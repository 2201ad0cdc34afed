"""Views: adapters from results to plotly figures and offline circuitsvis attention HTML.

Each view reshapes a result (means, CIs, labels) into a ``go.Figure`` and computes nothing
else; nothing here calls ``.show()`` or changes plotly's templates or renderers.
"""

from hookpatch.views._ablation import ablation_heatmap
from hookpatch.views._attention import AttentionView, attention_view, attention_view_html, javascript
from hookpatch.views._circuit import circuit_graph, faithfulness_curve_plot
from hookpatch.views._comparison import comparison_scatter
from hookpatch.views._dla import dla_bars, dla_heads_heatmap
from hookpatch.views._heads import ranked_heads_bar
from hookpatch.views._logit_lens import logit_lens_line
from hookpatch.views._patching import patching_heatmap
from hookpatch.views._paths import path_patching_bars, path_patching_heatmap

__all__ = [
    "AttentionView",
    "ablation_heatmap",
    "attention_view",
    "attention_view_html",
    "circuit_graph",
    "comparison_scatter",
    "dla_bars",
    "dla_heads_heatmap",
    "faithfulness_curve_plot",
    "javascript",
    "logit_lens_line",
    "path_patching_bars",
    "path_patching_heatmap",
    "patching_heatmap",
    "ranked_heads_bar",
]
