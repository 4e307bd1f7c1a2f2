"""A view's operators: arithmetic, comparisons and conversions answer with the
object it stands for; in-place operators run the object's own method through
the view, so that the change is recorded (NOTE [ View forms ] in ``_tracking.py``)."""

from __future__ import annotations

import operator
import types
from typing import Any

from . import _tracking_containers
from ._tracking import View, unwrap
from ._tracking_record import _get


def _forward(op: Any) -> Any:
    def method(self: View, other: Any) -> Any:
        return op(_get(self, "_pl_target"), unwrap(other))

    return method


def _reflected(op: Any) -> Any:
    def method(self: View, other: Any) -> Any:
        return op(unwrap(other), _get(self, "_pl_target"))

    return method


def _inplace(name: str) -> Any:
    def method(self: View, other: Any) -> Any:
        tp = type(_get(self, "_pl_target"))
        fn = getattr(tp, name, None)
        if fn is None:
            return NotImplemented  # Python falls back to `x = x + y`: an assignment
        if isinstance(fn, types.FunctionType):
            return fn(self, other)
        return _tracking_containers.call_mutator(self, name, fn, (other,), {})

    return method


def _unary(op: Any) -> Any:
    def method(self: View, *args: Any) -> Any:
        return op(_get(self, "_pl_target"), *args)

    return method


_BINARY: dict[str, Any] = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "matmul": operator.matmul,
    "truediv": operator.truediv, "floordiv": operator.floordiv, "mod": operator.mod,
    "pow": operator.pow, "lshift": operator.lshift, "rshift": operator.rshift,
    "and": operator.and_, "xor": operator.xor, "or": operator.or_, "divmod": divmod,
}  # fmt: skip
_COMPARE: dict[str, Any] = {
    "eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "le": operator.le,
    "gt": operator.gt, "ge": operator.ge,
}  # fmt: skip
_UNARY: dict[str, Any] = {
    "neg": operator.neg, "pos": operator.pos, "abs": abs, "invert": operator.invert,
    "int": int, "float": float, "complex": complex, "index": operator.index, "round": round,
    "bytes": bytes, "fspath": lambda obj: obj.__fspath__(),
    "trunc": lambda obj: obj.__trunc__(), "floor": lambda obj: obj.__floor__(),
    "ceil": lambda obj: obj.__ceil__(),
}  # fmt: skip


def _install(view: type) -> None:
    for name, op in _BINARY.items():
        setattr(view, f"__{name}__", _forward(op))
        setattr(view, f"__r{name}__", _reflected(op))
        if name != "divmod":
            setattr(view, f"__i{name}__", _inplace(f"__i{name}__"))
    for name, op in _COMPARE.items():
        setattr(view, f"__{name}__", _forward(op))
    for name, op in _UNARY.items():
        setattr(view, f"__{name}__", _unary(op))


_install(View)
