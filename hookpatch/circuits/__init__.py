"""Circuits: the model as a graph of senders and receivers, patching along its edges, edge
attribution, circuits and their faithfulness.

Data flow: :func:`graph` (nodes: input, heads, MLPs, logits; edges: sender output → receiver
input) → :func:`edge_patch` (exact patching of any edge set) and :func:`path_patch_sweep`
(every sender of a grid into a set of receivers, direct or as in the IOI paper) →
:func:`edge_attribution` (EAP / EAP-IG scores of every edge) → :func:`top_n`,
:func:`threshold`, :func:`greedy` (a :class:`Circuit`; :func:`prune`) →
:func:`faithfulness`, :func:`faithfulness_curve` (exact, with CPR/CMD and a random baseline);
:func:`compare_edges` checks attribution against exact edge patching → typed results.
"""

from hookpatch.circuits._attribution import edge_attribution as edge_attribution
from hookpatch.circuits._circuit import Circuit as Circuit
from hookpatch.circuits._circuit import greedy as greedy
from hookpatch.circuits._circuit import prune as prune
from hookpatch.circuits._circuit import threshold as threshold
from hookpatch.circuits._circuit import top_n as top_n
from hookpatch.circuits._compare import EdgeComparison as EdgeComparison
from hookpatch.circuits._compare import compare_edges as compare_edges
from hookpatch.circuits._faithfulness import Faithfulness as Faithfulness
from hookpatch.circuits._faithfulness import FaithfulnessCurve as FaithfulnessCurve
from hookpatch.circuits._faithfulness import faithfulness as faithfulness
from hookpatch.circuits._faithfulness import faithfulness_curve as faithfulness_curve
from hookpatch.circuits._graph import Edge as Edge
from hookpatch.circuits._graph import Graph as Graph
from hookpatch.circuits._graph import Node as Node
from hookpatch.circuits._graph import Receiver as Receiver
from hookpatch.circuits._graph import graph as graph
from hookpatch.circuits._patching import edge_patch as edge_patch
from hookpatch.circuits._patching import path_patch_sweep as path_patch_sweep

__all__ = [
    "Circuit",
    "Edge",
    "EdgeComparison",
    "Faithfulness",
    "FaithfulnessCurve",
    "Graph",
    "Node",
    "Receiver",
    "compare_edges",
    "edge_attribution",
    "edge_patch",
    "faithfulness",
    "faithfulness_curve",
    "graph",
    "greedy",
    "path_patch_sweep",
    "prune",
    "threshold",
    "top_n",
]
