"""Weight trees (the format layer's frozen dataclasses and tuples of tensors) as flat lists of tensors and back:
compiled functions take lists of tensors, not dataclasses, and reuse one compilation per tree structure."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

import tensorflow as tf


@dataclass(frozen=True)
class _Static:
    """A plain value of a tree (an int, a tuple of ints): part of its structure, not one of its leaves."""

    value: object


def _is_static(tree) -> bool:
    return isinstance(tree, (int, float, str)) or (isinstance(tree, tuple) and all(isinstance(i, int) for i in tree)
                                                    and len(tree) > 0)


def leaves(tree) -> list:
    """The tensors of a weight tree, depth first (the order `rebuild` consumes them in)."""
    if tree is None or _is_static(tree):
        return []
    if isinstance(tree, (tf.Variable, tf.Tensor)):
        return [tree]
    if isinstance(tree, tuple):
        return [leaf for item in tree for leaf in leaves(item)]
    return [leaf for f in dataclasses.fields(tree) for leaf in leaves(getattr(tree, f.name))]


def structure_of(tree):
    """A hashable description of a weight tree's shape: which containers, which fields are absent."""
    if tree is None or isinstance(tree, (tf.Variable, tf.Tensor)):
        return tree is not None
    if _is_static(tree):
        return _Static(tree)
    if isinstance(tree, tuple):
        return tuple(structure_of(item) for item in tree)
    return (type(tree), tuple(structure_of(getattr(tree, f.name)) for f in dataclasses.fields(tree)))


def rebuild(structure, items: Iterator):
    """The tree `structure_of` described, from an iterator over its `leaves`."""
    if isinstance(structure, bool):
        return next(items) if structure else None
    if isinstance(structure, _Static):
        return structure.value
    if isinstance(structure, tuple) and structure and isinstance(structure[0], type):
        kind, children = structure
        return kind(*(rebuild(child, items) for child in children))
    return tuple(rebuild(child, items) for child in structure)
