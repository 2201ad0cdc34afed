"""hookpatch: causal experiments on transformer language models, on TransformerLens 4.

Data flow: prompt set → model run and cache → metric → hooks → sweeps / paths and edges
(circuits) / readouts / attribution → results with labels → views → report.
"""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from hookpatch.attribution import attribution_sweep as attribution_sweep
from hookpatch.attribution import compare as compare
from hookpatch.errors import HookpatchError as HookpatchError
from hookpatch.metrics import AnswerLoss as AnswerLoss
from hookpatch.metrics import AnswerProbability as AnswerProbability
from hookpatch.metrics import KLToClean as KLToClean
from hookpatch.metrics import LogitDiff as LogitDiff
from hookpatch.metrics import Metric as Metric
from hookpatch.metrics import Normalized as Normalized
from hookpatch.metrics import evaluate as evaluate
from hookpatch.model import load_model as load_model
from hookpatch.model import model_facts as model_facts
from hookpatch.model import tiny_model as tiny_model
from hookpatch.readouts import dla_by_component as dla_by_component
from hookpatch.readouts import dla_by_head as dla_by_head
from hookpatch.readouts import logit_lens as logit_lens
from hookpatch.readouts import predictions as predictions
from hookpatch.readouts import rank_heads as rank_heads
from hookpatch.results import SweepResult as SweepResult
from hookpatch.sweeps import ablation_sweep as ablation_sweep
from hookpatch.sweeps import patch_sweep as patch_sweep
from hookpatch.tasks import PromptSet as PromptSet
from hookpatch.tasks import ioi_prompts as ioi_prompts
from hookpatch.tasks import make_prompt_set as make_prompt_set
from hookpatch.tasks import pronoun_prompts as pronoun_prompts

try:
    __version__ = _version("hookpatch")
except _PackageNotFoundError:  # a source tree on sys.path that pip never installed
    __version__ = "0+unknown"

__all__ = [
    "AnswerLoss",
    "AnswerProbability",
    "HookpatchError",
    "KLToClean",
    "LogitDiff",
    "Metric",
    "Normalized",
    "PromptSet",
    "SweepResult",
    "ablation_sweep",
    "attribution_sweep",
    "compare",
    "dla_by_component",
    "dla_by_head",
    "evaluate",
    "ioi_prompts",
    "load_model",
    "logit_lens",
    "make_prompt_set",
    "model_facts",
    "patch_sweep",
    "predictions",
    "pronoun_prompts",
    "rank_heads",
    "tiny_model",
]
