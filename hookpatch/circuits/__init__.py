"""Circuits: the model as a graph of senders and receivers, and patching along its edges.

Data flow: :func:`graph` (nodes: input, heads, MLPs, logits; edges: sender output → receiver
input) → :func:`edge_patch` (exact patching of any edge set) and :func:`path_patch_sweep`
(every sender of a grid into a set of receivers, direct or as in the IOI paper) → typed
results (:class:`hookpatch.results.SweepResult`).
"""

from hookpatch.circuits._graph import Edge as Edge
from hookpatch.circuits._graph import Graph as Graph
from hookpatch.circuits._graph import Node as Node
from hookpatch.circuits._graph import Receiver as Receiver
from hookpatch.circuits._graph import graph as graph
from hookpatch.circuits._patching import edge_patch as edge_patch
from hookpatch.circuits._patching import path_patch_sweep as path_patch_sweep

__all__ = ["Edge", "Graph", "Node", "Receiver", "edge_patch", "graph", "path_patch_sweep"]
