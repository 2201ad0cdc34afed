"""Attribution patching, integrated gradients, and their comparison with activation patching.

- :func:`attribution_sweep` — gradient × (clean − corrupted) on the grids of ``patch_sweep``
  (``steps > 1``: integrated gradients; :func:`integrated_gradients_sweep` defaults to 16);
- :func:`site_attributions` — the same at raw hook names, element-wise;
- :func:`compare` — attribution vs activation patching: correlations, top-k overlap, sign
  agreement with bootstrap CIs, and the cells where they disagree most.
"""

from hookpatch.attribution._atp import attribution_sweep, integrated_gradients_sweep
from hookpatch.attribution._compare import Comparison, Statistic, compare, compare_results
from hookpatch.attribution._sites import SiteAttributions, site_attributions

__all__ = [
    "Comparison",
    "SiteAttributions",
    "Statistic",
    "attribution_sweep",
    "compare",
    "compare_results",
    "integrated_gradients_sweep",
    "site_attributions",
]
