"""A compiled step called with its weights, caches and history bound once, not on every call.

A decode step takes every weight of the model as an argument (about 150 for a small model) besides its two
per-call tensors. Calling its concrete function with the structured arguments canonicalizes and type-checks every
one of them on each call, milliseconds of Python a step. A `BoundStep` flattens the arguments once, remembers where the per-call tensors sit among the flat
inputs, and afterwards only puts the new tensors there. It uses the concrete function's flat call, a private
TensorFlow API (present from 2.0 to the 2.21 this project runs on); the outputs come back structured.
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow.python.eager.polymorphic_function import function_type_utils


class BoundStep:
    """`step` (a tf.function) traced for `arguments`, callable with new values of the tensors in `per_call`
    (tensors of `arguments`, same shapes and dtypes); every other argument stays what it was when bound."""

    def __init__(self, step, arguments: tuple, per_call: tuple):
        self.concrete = step.get_concrete_function(*arguments)
        bound = function_type_utils.canonicalize_function_inputs(arguments, {}, self.concrete.function_type)
        self.flat = list(self.concrete.function_type.unpack_inputs(bound))
        tensors = [(position, value) for position, value in enumerate(per_call) if isinstance(value, tf.Tensor)]
        # (position in per_call, index among the flat inputs) of every per-call tensor
        self.slots = [(position, index) for position, value in tensors
                      for index, flat in enumerate(self.flat) if flat is value]
        if len(self.slots) != len(tensors):
            raise RuntimeError(f"binding {step}: found {len(self.slots)} of its {len(tensors)} per-call tensors "
                               "among the flat inputs")

    def __call__(self, per_call: tuple):
        flat = list(self.flat)
        for position, index in self.slots:
            flat[index] = per_call[position]
        return self.concrete._call_flat(flat, self.concrete.captured_inputs)  # pylint: disable=protected-access
