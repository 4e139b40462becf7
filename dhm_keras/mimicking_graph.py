"""Who mimics whom: the mimicking graph as data.

DHM lets every head mimic every other head. Variants of the method differ
only in that graph, so it is a value, resolved once per model into an
ordered tuple of weighted (teacher, student) edges. The loss sums exactly
these terms and the training model creates a metric (a TensorBoard curve)
for exactly these terms, so what is logged is what is trained.

A graph is given (``mimicking.graph`` in Gin) as one of the presets

* ``'all_pairs'`` (DHM, the default): every ordered pair of distinct heads;
* ``'main_teaches'``: ``b0`` teaches every branch, nothing else;
* ``'deep_teaches_shallow'``: a head teaches every head that forks shallower
  (``b0 -> b1, b0 -> b2, b1 -> b2`` for three heads);
* ``'shallow_teaches_deep'``: the reverse (``b2 -> b1, b2 -> b0, b1 -> b0``);

or as an explicit sequence of edges, each ``(teacher, student)``,
``(teacher, student, weight)`` or ``"teacher->student"``; a weight scales that
term (default 1). Fork depth follows the head numbering (`dhm_keras.heads`).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Iterable, Sequence, Tuple, Union

from dhm_keras import heads as heads_lib

PRESETS = ("all_pairs", "main_teaches", "deep_teaches_shallow", "shallow_teaches_deep")
DEFAULT = "all_pairs"


@dataclasses.dataclass(frozen=True)
class Edge:
    """One mimicking term: `student` mimics `teacher`'s (stop-gradient) prediction."""

    teacher: str
    student: str
    weight: float = 1.0

    @property
    def name(self) -> str:
        return heads_lib.pair_name(self.teacher, self.student)


GraphSpec = Union[str, Sequence]


def _preset_edges(preset: str, heads: Sequence[str]) -> list:
    pairs = [(t, s) for s in heads for t in heads if t != s]
    keep = {
        "all_pairs": lambda t, s: True,
        "main_teaches": lambda t, s: t == heads_lib.MAIN,
        "deep_teaches_shallow": heads_lib.deeper,
        "shallow_teaches_deep": lambda t, s: heads_lib.deeper(s, t),
    }[preset]
    return [Edge(t, s) for t, s in pairs if keep(t, s)]


def _parse_edge(item) -> Edge:
    if isinstance(item, Edge):
        return item
    if isinstance(item, str):
        parts = [p.strip() for p in item.split("->")]
        if len(parts) != 2:
            raise ValueError(f"mimicking edge {item!r} must read 'teacher->student'")
        return Edge(parts[0], parts[1])
    if isinstance(item, (list, tuple)) and len(item) in (2, 3):
        weight = item[2] if len(item) == 3 else 1.0
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or weight < 0:
            raise ValueError(f"mimicking edge {tuple(item)!r}: the weight must be a number >= 0")
        return Edge(str(item[0]), str(item[1]), float(weight))
    raise ValueError(
        f"mimicking edge {item!r} must be (teacher, student), (teacher, student, weight) "
        "or 'teacher->student'"
    )


def resolve(graph: GraphSpec, heads: Iterable[str]) -> Tuple[Edge, ...]:
    """The edges of `graph` among `heads`, ordered student-major (b0's terms first).

    A preset adapts to any number of heads; an explicit list must name only
    heads of the model, never a head mimicking itself, and each edge once.
    """
    heads = heads_lib.ordered(heads)
    if graph is None:
        graph = DEFAULT
    if isinstance(graph, str) and "->" not in graph:
        if graph not in PRESETS:
            raise ValueError(f"unknown mimicking.graph {graph!r}; presets: {', '.join(PRESETS)}, "
                             "or a list of (teacher, student[, weight]) edges")
        return tuple(_preset_edges(graph, heads))
    items = [graph] if isinstance(graph, str) else list(graph)
    edges = [_parse_edge(item) for item in items]
    seen = set()
    for edge in edges:
        unknown = [h for h in (edge.teacher, edge.student) if h not in heads]
        if unknown:
            raise ValueError(f"mimicking edge {edge.name} names heads {unknown} the model does "
                             f"not have; heads are {heads}")
        if edge.teacher == edge.student:
            raise ValueError(f"mimicking edge {edge.name}: a head cannot mimic itself")
        if (edge.teacher, edge.student) in seen:
            raise ValueError(f"mimicking edge {edge.name} is listed twice")
        seen.add((edge.teacher, edge.student))
    position = {h: i for i, h in enumerate(heads)}
    return tuple(sorted(edges, key=lambda e: (position[e.student], position[e.teacher])))


def as_data(graph: GraphSpec):
    """`graph` as plain JSON-able data, the form config.json records."""
    if graph is None or isinstance(graph, str):
        return graph or DEFAULT
    return [[e.teacher, e.student, e.weight] for e in map(_parse_edge, graph)]
