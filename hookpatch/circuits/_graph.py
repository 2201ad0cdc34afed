"""The model as a computational graph: senders, receivers and the edges between them.

A transformer's residual stream is a sum: every attention head and every MLP adds its output to
it, and every later head and MLP reads the sum. Writing that sum out term by term gives a graph
whose *nodes* are the input (the embeddings), each attention head (query heads), each MLP and
the logits, and whose *edges* run from a sender's output to a receiver's input:

* a head receives through its query, key and value inputs separately (``L9H9.q``, ``L9H9.k``,
  ``L9H9.v``); under grouped-query attention the key and value inputs belong to KV heads
  (``L9KV1.k``), each feeding a group of query heads (:meth:`Graph.query_heads`);
* an MLP receives through its input (``MLP3``), which comes after its own layer's attention, so
  a layer's heads send to the same layer's MLP;
* the logits receive the final residual stream (``logits``).

Edge labels read ``sender->receiver``: ``L5H1->L9H9.q``, ``MLP0->logits``, ``input->MLP1``.
The graph is pure data (built from :func:`hookpatch.model_facts`), so it pickles and compares
equal across processes; patching it is :mod:`hookpatch.circuits._edges`' job.

Blocks whose attention and MLP read the same residual stream in parallel, or that normalise
after the residual sum, do not decompose this way, and the graph refuses them.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any, Literal

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from hookpatch.errors import HookpatchError
from hookpatch.model._facts import ModelFacts, model_facts

NodeKind = Literal["input", "head", "mlp", "logits"]
ReceiverInput = Literal["q", "k", "v", "mlp", "logits"]
Site = tuple[int, ReceiverInput]  # where receivers read: (layer, input); the logits' layer is n_layers
HEAD_INPUTS = ("q", "k", "v")
RECEIVER_INPUTS = ("q", "k", "v", "mlp", "logits")


@dataclass(frozen=True, order=True)
class Node:
    """A sender or receiver of the graph: the input, a query head, an MLP or the logits.

    ``layer`` orders nodes along the residual stream (input: -1, logits: ``n_layers``); a head
    has a ``head`` index; ``label`` reads ``input``, ``L3H1``, ``MLP3``, ``logits``."""

    kind: NodeKind
    layer: int
    head: int | None = None

    @property
    def label(self) -> str:
        if self.kind == "head":
            return f"L{self.layer}H{self.head}"
        if self.kind == "mlp":
            return f"MLP{self.layer}"
        return self.kind

    def __repr__(self) -> str:
        return f"Node({self.label})"


@dataclass(frozen=True, order=True)
class Receiver:
    """One input a node reads the residual stream through.

    ``input`` is ``"q"``, ``"k"`` or ``"v"`` for a head (``head`` is a query head for ``q``
    and a KV head for ``k``/``v``), ``"mlp"`` for an MLP's input, ``"logits"`` for the final
    residual stream. ``label``: ``L3H1.q``, ``L3H1.k`` (``L3KV0.k`` under grouped-query
    attention, where ``kv_labels`` is set), ``MLP3``, ``logits``."""

    input: ReceiverInput
    layer: int
    head: int | None = None
    kv_labels: bool = field(default=False, compare=False)

    @property
    def label(self) -> str:
        if self.input in HEAD_INPUTS:
            kv = self.kv_labels and self.input != "q"
            return f"L{self.layer}{'KV' if kv else 'H'}{self.head}.{self.input}"
        return f"MLP{self.layer}" if self.input == "mlp" else "logits"

    def __repr__(self) -> str:
        return f"Receiver({self.label})"


@dataclass(frozen=True, order=True)
class Edge:
    """Sender output → receiver input; ``label`` reads ``L5H1->L9H9.q``."""

    sender: Node
    receiver: Receiver

    @property
    def label(self) -> str:
        return f"{self.sender.label}->{self.receiver.label}"

    def __repr__(self) -> str:
        return f"Edge({self.label})"


_SENDER = re.compile(r"input|L(\d+)H(\d+)|MLP(\d+)")
_RECEIVER = re.compile(r"L(\d+)(H|KV)(\d+)\.([qkv])|MLP(\d+)|logits")


@dataclass(frozen=True)
class EdgeIndices:
    """An edge set given by its positions in ``graph.edges`` (sorted, without repeats): how
    circuits hand a complement of tens of thousands of edges to edge patching without
    building and checking an :class:`Edge` per edge."""

    indices: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.indices)


@dataclass(frozen=True)
class Graph:
    """The senders, receivers and edges of a model (see the module docstring).

    Example:
        >>> g = graph(model)
        >>> g.n_edges, g.edges[0].label
        >>> g.edge("L0H1->L2H3.q"), g.receivers_of("L2H3")        # q, k, v of a head
        >>> g.query_heads("L2KV0.k")                               # under GQA: the heads it feeds
    """

    facts: ModelFacts
    has_mlps: bool

    # ---------------------------------------------------------------- nodes and inputs

    @cached_property
    def senders(self) -> tuple[Node, ...]:
        """The input, then per layer its heads and its MLP, in residual-stream order."""
        out = [Node("input", -1)]
        for layer in range(self.facts.n_layers):
            out += [Node("head", layer, h) for h in range(self.facts.n_heads)]
            out += [Node("mlp", layer)] if self.has_mlps else []
        return tuple(out)

    @cached_property
    def nodes(self) -> tuple[Node, ...]:
        """Every node: the senders and the logits."""
        return (*self.senders, Node("logits", self.facts.n_layers))

    @cached_property
    def receivers(self) -> tuple[Receiver, ...]:
        """Per layer each head's q inputs, each (KV) head's k and v inputs, the MLP input;
        then the logits."""
        f, kv = self.facts, self.facts.grouped_query
        out: list[Receiver] = []
        for layer in range(f.n_layers):
            out += [Receiver("q", layer, h) for h in range(f.n_heads)]
            for name in ("k", "v"):
                out += [Receiver(name, layer, g, kv) for g in range(f.n_kv_heads)]  # type: ignore[arg-type]
            out += [Receiver("mlp", layer)] if self.has_mlps else []
        return (*out, Receiver("logits", f.n_layers))

    @cached_property
    def edges(self) -> tuple[Edge, ...]:
        """Every edge, grouped by receiver (in :attr:`receivers` order), senders in order."""
        return tuple(Edge(s, r) for r, start, count in self._blocks for s in self.senders[:count])

    @cached_property
    def _blocks(self) -> tuple[tuple[Receiver, int, int], ...]:
        """Per receiver, the index of its first edge and how many senders it reads: senders
        are in residual-stream order, so a receiver reads a prefix of them."""
        per_layer = self.facts.n_heads + (1 if self.has_mlps else 0)  # senders per layer
        out, start = [], 0
        for r in self.receivers:
            if r.input == "logits":
                count = len(self.senders)
            else:  # the input, the earlier layers, and for an MLP its own layer's heads
                count = 1 + r.layer * per_layer + (self.facts.n_heads if r.input == "mlp" else 0)
            out.append((r, start, count))
            start += count
        return tuple(out)

    @cached_property
    def _block_starts(self) -> list[int]:
        return [start for _, start, _ in self._blocks]

    @cached_property
    def _starts(self) -> dict[Receiver, int]:
        return {r: start for r, start, _ in self._blocks}

    @cached_property
    def receiver_node_matrix(self) -> Bool[Tensor, "receiver node"]:
        """``[receiver, node]``: True where a receiver is an input of the node (a head's q; its
        KV head's k and v, under grouped-query attention every query head the KV head feeds;
        an MLP's input; the logits). Senders are the first nodes, in :attr:`senders` order."""
        index = {n: i for i, n in enumerate(self.nodes)}
        out = torch.zeros(len(self.receivers), len(self.nodes), dtype=torch.bool)
        for i, r in enumerate(self.receivers):
            if r.input == "logits":
                out[i, -1] = True
            elif r.input == "mlp":
                out[i, index[Node("mlp", r.layer)]] = True
            else:
                for h in self.query_heads(r):
                    out[i, index[Node("head", r.layer, h)]] = True
        return out

    @cached_property
    def _sender_index(self) -> dict[Node, int]:
        return {s: i for i, s in enumerate(self.senders)}

    @property
    def n_edges(self) -> int:
        _, start, count = self._blocks[-1]
        return start + count

    def index(self, edge: Edge | str) -> int:
        """The position of ``edge`` in :attr:`edges`."""
        e = self.edge(edge)
        return self._starts[e.receiver] + self._sender_index[e.sender]

    def indices(self, edges: Iterable[Edge]) -> list[int]:
        """The positions of known :class:`Edge` s in :attr:`edges` (checked as a batch: one
        call for many edges)."""
        starts, senders = self._starts, self._sender_index
        out = []
        for e in edges:
            start, at = starts.get(e.receiver), senders.get(e.sender)
            if start is None or at is None or not sends_to(e.sender, e.receiver):
                self.edge(e)  # raises, saying why
            out.append(start + at)  # type: ignore[operator]
        return out

    def edge_ends(self, index: Int[Tensor, " n"]) -> tuple[Int[Tensor, " n"], Int[Tensor, " n"]]:
        """For edge indices, the indices of their receivers in :attr:`receivers` and of their
        senders in :attr:`senders` (vectorized :meth:`edge_at`)."""
        starts = torch.tensor(self._block_starts, dtype=torch.long)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.n_edges):
            raise HookpatchError(f"edge indices must lie in 0..{self.n_edges - 1}.")
        receiver = torch.searchsorted(starts, index, right=True) - 1
        return receiver, index - starts[receiver]

    def edge_at(self, index: int) -> Edge:
        """``edges[index]``, without building the list of every edge."""
        i = bisect.bisect_right(self._block_starts, index) - 1
        r, start, count = self._blocks[max(i, 0)]
        if not 0 <= index - start < count:
            raise HookpatchError(f"edge index {index} is outside 0..{self.n_edges - 1}.")
        return Edge(self.senders[index - start], r)

    def query_heads(self, receiver: Receiver | str) -> tuple[int, ...]:
        """The query heads a head receiver feeds: its own head for ``q``; the group sharing a
        KV head for ``k``/``v`` (one head without grouped-query attention)."""
        r = self.receiver(receiver)
        if r.input == "q" or r.head is None:
            return () if r.head is None else (r.head,)
        if r.input not in HEAD_INPUTS:
            return ()
        return tuple(self.facts.query_heads_of_kv_head(r.head))

    def receivers_of(self, node: Node | str) -> tuple[Receiver, ...]:
        """The inputs of a node: a head's q input and the k/v inputs of its (KV) head; an MLP's
        input; the logits."""
        n = self.node(node)
        if n.kind == "head":
            assert n.head is not None
            kv = self.facts.kv_head_of_query_head(n.head)
            return (Receiver("q", n.layer, n.head), Receiver("k", n.layer, kv, self.facts.grouped_query),
                    Receiver("v", n.layer, kv, self.facts.grouped_query))
        if n.kind == "mlp":
            return (Receiver("mlp", n.layer),)
        if n.kind == "logits":
            return (Receiver("logits", self.facts.n_layers),)
        raise HookpatchError("node 'input' has no inputs; it only sends.")

    # ---------------------------------------------------------------- parsing

    @cached_property
    def _node_set(self) -> frozenset[Node]:
        return frozenset(self.nodes)

    def node(self, node: Node | str) -> Node:
        """A node from its label (``"L3H1"``, ``"MLP3"``, ``"input"``, ``"logits"``), checked."""
        if isinstance(node, Node):
            if node not in self._node_set:
                raise HookpatchError(f"node {node.label!r} is not in this model's graph; {self._sizes()}.")
            return node
        if node == "logits":
            return self.nodes[-1]
        m = _SENDER.fullmatch(str(node).strip()) if isinstance(node, str) else None
        if m is None:
            raise HookpatchError(
                f"node {node!r} is not a node label; expected 'input', 'L<layer>H<head>' (e.g. 'L3H1'), "
                "'MLP<layer>' or 'logits'."
            )
        if m.group(1) is not None:
            found = Node("head", int(m.group(1)), int(m.group(2)))
        elif m.group(3) is not None:
            found = Node("mlp", int(m.group(3)))
        else:
            found = Node("input", -1)
        return self.node(found)

    def receiver(self, receiver: Receiver | str) -> Receiver:
        """A receiver from its label (``"L3H1.q"``, ``"L3KV0.k"``, ``"MLP3"``, ``"logits"``), checked."""
        if isinstance(receiver, Receiver):
            return self._known_receiver(receiver, receiver.label)
        text = str(receiver).strip() if isinstance(receiver, str) else None
        m = _RECEIVER.fullmatch(text) if text is not None else None
        if m is None:
            raise HookpatchError(
                f"receiver {receiver!r} is not a receiver label; expected 'L<layer>H<head>.q' "
                "(or .k/.v; 'L<layer>KV<kv_head>.k' under grouped-query attention), "
                "'MLP<layer>' or 'logits'."
            )
        if m.group(1) is not None:
            layer, kind, head, inp = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            f = self.facts
            if inp == "q" and kind == "KV":
                raise HookpatchError(
                    f"receiver {text!r}: a query input belongs to a query head; write 'L{layer}H{head}.q'."
                )
            if inp != "q" and f.grouped_query and kind == "H":
                raise HookpatchError(
                    f"receiver {text!r}: under grouped-query attention key and value inputs belong to "
                    f"KV heads ({f.n_kv_heads}, each feeding {f.group_size} query heads); query head {head} "
                    f"reads KV head {f.kv_head_of_query_head(head) if head < f.n_heads else '?'}, so write "
                    f"'L{layer}KV{f.kv_head_of_query_head(head) if head < f.n_heads else 0}.{inp}'."
                )
            found = Receiver(inp, layer, head, f.grouped_query)  # type: ignore[arg-type]
        elif m.group(5) is not None:
            found = Receiver("mlp", int(m.group(5)))
        else:
            found = Receiver("logits", self.facts.n_layers)
        return self._known_receiver(found, text)

    def _known_receiver(self, r: Receiver, text: Any) -> Receiver:
        found = self._receiver_lookup.get(r)
        if found is None:
            raise HookpatchError(f"receiver {text!r} is not in this model's graph; {self._sizes()}.")
        return found

    @cached_property
    def _receiver_lookup(self) -> dict[Receiver, Receiver]:
        return {r: r for r in self.receivers}

    def edge(self, edge: Edge | str | tuple[Any, Any]) -> Edge:
        """An edge from its label (``"L0H1->L2H3.q"``), a ``(sender, receiver)`` pair or an
        :class:`Edge`, checked against the graph."""
        if isinstance(edge, Edge):
            if edge.receiver in self._starts and edge.sender in self._sender_index and sends_to(
                edge.sender, edge.receiver
            ):
                return edge  # a known edge of this graph
            sender, receiver = self.node(edge.sender), self.receiver(edge.receiver)
        elif isinstance(edge, tuple) and len(edge) == 2:
            sender, receiver = self.node(edge[0]), self.receiver(edge[1])
        elif isinstance(edge, str) and "->" in edge:
            left, right = edge.split("->", 1)
            sender, receiver = self.node(left), self.receiver(right)
        else:
            raise HookpatchError(
                f"edge {edge!r} is not an edge; expected a label 'sender->receiver' (e.g. 'L0H1->L2H3.q'), "
                "a (sender, receiver) pair or an Edge."
            )
        if sender.kind == "logits":
            raise HookpatchError(f"edge {edge!r}: the logits only receive; they send to nothing.")
        if not sends_to(sender, receiver):
            where = "the same or an earlier layer" if receiver.input != "mlp" else "an earlier layer"
            raise HookpatchError(
                f"edge {sender.label}->{receiver.label} is not in the graph: {receiver.label} (layer "
                f"{receiver.layer}) cannot read {sender.label} (layer {sender.layer}), which writes to the "
                f"residual stream after it. A head's inputs read senders from earlier layers; an MLP's input "
                f"also reads its own layer's heads. Pick a receiver after the sender ({where} is not allowed)."
            )
        return Edge(sender, receiver)

    def edge_set(self, edges: Iterable[Edge | str | tuple[Any, Any]] | Edge | str) -> tuple[Edge, ...]:
        """Edges (labels, pairs or :class:`Edge` s), checked and without repeats, in graph order."""
        if isinstance(edges, Edge | str):
            edges = [edges]
        try:
            items = list(edges)
        except TypeError:
            raise HookpatchError(
                f"edges: expected a list of edges (labels like 'L0H1->L2H3.q', pairs or Edge objects), "
                f"got {type(edges).__name__}."
            ) from None
        found = list(dict.fromkeys(e if isinstance(e, Edge) else self.edge(e) for e in items))
        order = self.indices(found)
        return tuple(e for _, e in sorted(zip(order, found, strict=True), key=lambda pair: pair[0]))

    def edges_into(self, receivers: Iterable[Receiver | str] | Receiver | str) -> tuple[Edge, ...]:
        """Every edge into the given receivers."""
        if isinstance(receivers, Receiver | str):
            receivers = [receivers]
        wanted = {self.receiver(r) for r in receivers}
        return tuple(e for e in self.edges if e.receiver in wanted)

    def edges_from(self, senders: Iterable[Node | str] | Node | str) -> tuple[Edge, ...]:
        """Every edge out of the given senders."""
        if isinstance(senders, Node | str):
            senders = [senders]
        wanted = {self.node(s) for s in senders}
        return tuple(e for e in self.edges if e.sender in wanted)

    def __iter__(self) -> Iterator[Edge]:
        return iter(self.edges)

    def __len__(self) -> int:
        return self.n_edges

    def __contains__(self, edge: object) -> bool:
        try:
            self.edge(edge)  # type: ignore[arg-type]
        except HookpatchError:
            return False
        return True

    def __repr__(self) -> str:
        f = self.facts
        kv = f", {f.n_kv_heads} KV heads" if f.grouped_query else ""
        mlps = "" if self.has_mlps else ", no MLPs"
        return (f"Graph({f.n_layers} layers × {f.n_heads} heads{kv}{mlps}: {len(self.senders)} senders, "
                f"{len(self.receivers)} receivers, {self.n_edges} edges)")

    def _sizes(self) -> str:
        f = self.facts
        heads = f"heads 0..{f.n_heads - 1}"
        if f.grouped_query:
            heads += f", KV heads 0..{f.n_kv_heads - 1}"
        return f"the model has layers 0..{f.n_layers - 1}, {heads}{'' if self.has_mlps else ', no MLPs'}"


def sends_to(sender: Node, receiver: Receiver) -> bool:
    """Whether ``receiver`` reads ``sender``'s output: heads read earlier layers, an MLP also
    its own layer's heads, the logits everything."""
    if sender.kind == "logits":
        return False
    if receiver.input == "logits":
        return True
    if receiver.input == "mlp":
        return sender.layer < receiver.layer or (sender.kind == "head" and sender.layer == receiver.layer)
    return sender.layer < receiver.layer


def refusal(model: Any) -> str | None:
    """Why the graph cannot express ``model``'s blocks, or None."""
    cfg = model.cfg
    if getattr(cfg, "parallel_attn_mlp", False):
        return "its attention and MLP read the residual stream in parallel (cfg.parallel_attn_mlp)"
    if getattr(cfg, "normalization_type", None) not in ("LN", "LNPre", "RMS", "RMSPre", None):
        return f"its normalization ({cfg.normalization_type!r}) is not a pre-norm the graph can split"
    if getattr(cfg, "original_architecture", None) in _POST_NORM:
        return f"{cfg.original_architecture} normalises after the residual sum (post-norm blocks)"
    for i, block in enumerate(getattr(model, "blocks", [])):
        if getattr(block, "attn", None) is None:
            return f"block {i} has no attention (an SSM or mixer block)"
    return None


_POST_NORM = ("BertForMaskedLM", "BertModel", "T5ForConditionalGeneration")


def graph(model: Any) -> Graph:
    """The computational graph of ``model`` (a TransformerBridge): see :class:`Graph`.

    Raises a :class:`HookpatchError` for blocks the graph cannot express (parallel attention
    and MLP, post-norm, blocks without attention)."""
    facts = model_facts(model)
    why = refusal(model)
    if why is not None:
        name = getattr(model.cfg, "model_name", None) or type(model).__name__
        raise HookpatchError(
            f"model: the circuit graph cannot express {name!r}: {why}. Edges need blocks that add "
            "attention and then the MLP to one residual stream (GPT-2, Llama, Qwen, Mistral, Gemma 2 "
            "style); use node-level sweeps (patch_sweep) for this model."
        )
    return _graph(facts, not getattr(model.cfg, "attn_only", False))


@lru_cache(maxsize=32)
def _graph(facts: ModelFacts, has_mlps: bool) -> Graph:
    """One graph per model shape, so its edge list and index are built once."""
    return Graph(facts, has_mlps=has_mlps)


def as_graph(model: Any, graph_: Graph | None = None) -> Graph:
    """``graph_`` checked against ``model``'s facts, or the model's graph."""
    if graph_ is None:
        return graph(model)
    if not isinstance(graph_, Graph):
        raise HookpatchError(f"graph: expected a Graph (hookpatch.circuits.graph(model)), got {type(graph_).__name__}.")
    if graph_.facts != model_facts(model):
        raise HookpatchError("graph: this graph was built for a model of other sizes; build it with graph(model).")
    return graph_


def labels(items: Sequence[Edge | Node | Receiver]) -> tuple[str, ...]:
    """The labels of edges, nodes or receivers."""
    return tuple(item.label for item in items)
