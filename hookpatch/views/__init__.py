"""Views: adapters from results to plotly figures and offline circuitsvis attention HTML.

Each view reshapes a result (means, CIs, labels) into a ``go.Figure`` and computes nothing
else; nothing here calls ``.show()`` or changes plotly's templates or renderers.
"""

from hookpatch.views.ablation import ablation_heatmap
from hookpatch.views.attention import AttentionView, attention_view, attention_view_html, javascript
from hookpatch.views.comparison import comparison_scatter
from hookpatch.views.dla import dla_bars, dla_heads_heatmap
from hookpatch.views.heads import ranked_heads_bar
from hookpatch.views.logit_lens import logit_lens_line
from hookpatch.views.patching import patching_heatmap

__all__ = [
    "AttentionView",
    "ablation_heatmap",
    "attention_view",
    "attention_view_html",
    "comparison_scatter",
    "dla_bars",
    "dla_heads_heatmap",
    "javascript",
    "logit_lens_line",
    "patching_heatmap",
    "ranked_heads_bar",
]
