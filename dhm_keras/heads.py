"""Head naming: the one place that knows what ``b0``, ``b1``, ... and ``bK_`` mean.

A DHM network has one main head ``b0`` (the backbone's classifier, the only
head that is deployed) and auxiliary heads ``b1`` .. ``bN`` forked from
intermediate layers. The conventions every other module relies on:

* a network's outputs are a dict of logits keyed by head name, ``b0`` present;
* heads are ordered main first, then branches by number (``b2`` before ``b10``);
* every layer of branch ``bK`` (K >= 1) is named ``bK_...``; everything else
  (stem, backbone stages, the ``b0_`` classifier) belongs to ``b0``;
* the higher a branch's number, the shallower its fork: ``b1`` forks closest
  to the top classifier, so fork depth decreases ``b0 > b1 > b2 > ...``.
  The mimicking-graph presets that follow depth rely on this.

Pure Python (no TensorFlow), so losses, models, analysis and tools share it.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

MAIN = "b0"
_HEAD_NAME = re.compile(r"^b(0|[1-9][0-9]*)$")
_LAYER_PREFIX = re.compile(r"^(b[0-9]+)_")


def is_head(name: str) -> bool:
    """Whether `name` is a head name ``b0``, ``b1``, ... (no leading zeros)."""
    return isinstance(name, str) and bool(_HEAD_NAME.match(name))


def index(head: str) -> int:
    """``bK`` -> K; a name that is not a head is a ValueError."""
    if not is_head(head):
        raise ValueError(f"{head!r} is not a head name; heads are named 'b0', 'b1', 'b2', ...")
    return int(head[1:])


def name(k: int) -> str:
    """K -> ``bK``."""
    return f"b{int(k)}"


def ordered(names: Iterable[str]) -> list[str]:
    """Head names main first, then branches in numeric order (b2 before b10)."""
    return sorted(names, key=index)


def branches(names: Iterable[str]) -> list[str]:
    """The auxiliary heads among `names`, in order."""
    return [h for h in ordered(names) if h != MAIN]


def layer_prefix(head: str) -> str:
    """Name prefix of every layer owned by `head` beyond its fork ("b1" -> "b1_")."""
    return f"{head}_"


def head_of_layer(layer_name: str) -> str:
    """The head a layer belongs to: ``bK`` for branch layers, ``b0`` for the rest."""
    match = _LAYER_PREFIX.match(layer_name)
    return match.group(1) if match else MAIN


def check_outputs(outputs, what: str = "network") -> Mapping:
    """`outputs` if it is a dict of head names holding ``b0``, else a ValueError
    that says what a multi-head network must look like."""
    if not isinstance(outputs, Mapping) or MAIN not in outputs:
        raise ValueError(
            f"the {what} must be a functional model whose outputs are a dict of logits keyed "
            f"'b0' (main head), 'b1', 'b2', ...; got {type(outputs).__name__}"
            + (f" with keys {sorted(outputs)}" if isinstance(outputs, Mapping) else "")
        )
    bad = [k for k in outputs if not is_head(k)]
    if bad:
        raise ValueError(f"the {what}'s outputs {bad} are not head names ('b0', 'b1', ...)")
    return outputs


def pair_name(teacher: str, student: str) -> str:
    """Name of the term in which `student` mimics `teacher` (``teacher->student``)."""
    return f"{teacher}->{student}"


def deeper(a: str, b: str) -> bool:
    """Whether head `a` forks deeper in the network than head `b` (see module doc)."""
    return index(a) < index(b)
