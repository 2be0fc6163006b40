"""The tangent rules of :mod:`tmlib.lie.forward_mode`: for each torch function, the output's
tangents [k, *output.shape] from its inputs' (a rule per function; ``RULES``), and the calls refused
before they run.

A rule gets ``(tangents, out, args, kwargs)`` after the primal call, where ``tangents`` answers
``get(t)`` (t's tangents or None for a constant), ``of(t, shape)`` (broadcast to [k, *shape]) and
``k``; it returns out's tangents, or None where out does not depend on the input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["MAX_POOL_NAMES", "READ_KEYWORD_TENSORS", "REFUSED_BEFORE", "RULES", "Unsupported", "identity", "in_place",
           "max_pool2d"]


class Unsupported(Exception):
    """The forward called a function on an input-dependent tensor that has no tangent rule here."""


# A rule gets (tangents, out, args, kwargs) after the primal call and returns out's tangent
# [k, *out.shape]; it may recompute nothing the primal call already has in ``out``.


def _folded(tangent: torch.Tensor) -> torch.Tensor:
    """[k, b, ...] → [k·b, ...] for ops whose first dimension is a batch."""
    return tangent.reshape(-1, *tangent.shape[2:])


def _unfold(t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *out.shape)


def _first(tangents: Any, args) -> torch.Tensor:
    """The tangent of args[0], the only input-dependent argument these rules allow."""
    tangent = tangents.get(args[0])
    if tangent is None or tangents.any_of(args[1:]):
        raise Unsupported("only the first argument may depend on the input")
    return tangent


def _linear(tangents, out, args, kwargs):
    return F.linear(_first(tangents, args), args[1] if len(args) > 1 else kwargs["weight"])


def _conv(conv: Callable) -> Callable:
    def rule(tangents, out, args, kwargs):
        kwargs = dict(kwargs)
        kwargs.pop("bias", None)
        rest = list(args[3:])  # stride, padding, dilation, groups
        return _unfold(conv(_folded(_first(tangents, args)), args[1], None, *rest, **kwargs), out)

    return rule


def _linear_map(op: Callable) -> Callable:
    """Ops linear in their (batched) first argument with the other arguments fixed."""

    def rule(tangents, out, args, kwargs):
        return _unfold(op(_folded(_first(tangents, args)), *args[1:], **kwargs), out)

    return rule


def _shaped(tangents, out, args, kwargs):
    """Reshapes that keep the elements' order (view, reshape, flatten, squeeze, unsqueeze)."""
    return _first(tangents, args).reshape(tangents.k, *out.shape)


def identity(tangents, out, args, kwargs):
    return _first(tangents, args)


def _constant(tangents, out, args, kwargs):
    return None


def _relu(tangents, out, args, kwargs):
    return _first(tangents, args) * (out > 0)


def _elu(tangents, out, args, kwargs):
    # d elu / dx = 1 for x > 0, alpha·e^x = out + alpha otherwise (from out: the input may be
    # overwritten in place).
    alpha = args[1] if len(args) > 1 else kwargs.get("alpha", 1.0)
    return _first(tangents, args) * torch.where(out > 0, 1.0, out + alpha)


def _leaky_relu(tangents, out, args, kwargs):
    slope = args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01)
    return _first(tangents, args) * torch.full_like(out, slope).masked_fill_(out > 0, 1.0)  # out's dtype


def _prelu(tangents, out, args, kwargs):
    x, weight = args[0], args[1]
    w = weight.reshape(-1, *([1] * (x.dim() - 2))) if x.dim() > 1 and weight.numel() > 1 else weight
    return _first(tangents, args) * torch.where(x > 0, 1.0, w)


def _silu(tangents, out, args, kwargs):
    if kwargs.get("inplace") or (len(args) > 1 and args[1]):
        raise Unsupported("in-place silu overwrites the input its derivative needs")
    s = torch.sigmoid(args[0])
    return _first(tangents, args) * (s * (1 + args[0] * (1 - s)))


def _tanh(tangents, out, args, kwargs):
    return _first(tangents, args) * (1 - out * out)


def _sigmoid(tangents, out, args, kwargs):
    return _first(tangents, args) * (out * (1 - out))


def _batch_norm(tangents, out, args, kwargs):
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    bound = dict(zip(names, args)) | kwargs  # batch statistics were refused before the call
    tangent = _first(tangents, [bound["input"], bound["running_mean"], bound["running_var"], bound.get("weight"),
                                bound.get("bias")])
    scale = torch.rsqrt(bound["running_var"] + bound.get("eps", 1e-5))
    if bound.get("weight") is not None:
        scale = scale * bound["weight"]
    return tangent * scale.reshape(-1, *([1] * (out.dim() - 2)))


def _sum_of(terms: list, k: int, out: torch.Tensor) -> torch.Tensor:
    """The two-argument rules' sum of the terms whose argument depends on the input, as [k, *out.shape]."""
    present = [t for t in terms if t is not None]
    total = present[0] if len(present) == 1 else present[0] + present[1]
    return total.expand(k, *out.shape)


def _binary(kind: str) -> Callable:
    def rule(tangents, out, args, kwargs):
        a, b = args[0], args[1] if len(args) > 1 else kwargs["other"]
        ta, tb = tangents.of(a, out.shape), tangents.of(b, out.shape)
        if kind in ("add", "sub"):
            alpha = kwargs.get("alpha", 1) * (1 if kind == "add" else -1)
            if tb is not None and alpha != 1:
                tb = tb * alpha
            terms = [ta, tb]
        elif kind == "mul":
            if out is a and tb is not None:
                raise Unsupported("in-place mul by an input-dependent tensor (it overwrites the factor)")
            terms = [None if ta is None else ta * b, None if tb is None else tb * a]
        else:  # div: d(a / b) = da / b − db · (a / b) / b
            terms = [None if ta is None else ta / b, None if tb is None else -tb * (out / b)]
        return _sum_of(terms, tangents.k, out)

    return rule


def _rsub(tangents, out, args, kwargs):  # other − self·alpha, self the tensor
    alpha = kwargs.get("alpha", 1)
    return -_first(tangents, args) * alpha


def _neg(tangents, out, args, kwargs):
    return -_first(tangents, args)


def _dims(args, kwargs, ndim: int, start: int = 1):
    dim = args[start] if len(args) > start else kwargs.get("dim")
    if dim is None:
        return None
    dims = [dim] if isinstance(dim, int) else list(dim)
    return [d % ndim + 1 for d in dims]  # shifted past the k dimension


def _reduction(op: str) -> Callable:
    def rule(tangents, out, args, kwargs):
        tangent = _first(tangents, args[:1])
        if any(isinstance(a, torch.Tensor) for a in args[1:]) or "dtype" in kwargs:
            raise Unsupported(f"{op} with these arguments")
        if len(args) > 3:
            raise Unsupported(f"{op} with a dtype")
        dims = _dims(args, kwargs, args[0].dim())
        keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        if dims is None:
            dims, keepdim = list(range(1, tangent.dim())), False
        reduced = tangent.sum(dims, keepdim=keepdim) if op == "sum" else tangent.mean(dims, keepdim=keepdim)
        return reduced.reshape(tangents.k, *out.shape)

    return rule


def _norm(tangents, out, args, kwargs):
    names = ("input", "p", "dim", "keepdim", "dtype")
    bound = dict(zip(names, args)) | kwargs
    if bound.get("p", "fro") not in (2, 2.0, "fro", None) or bound.get("dtype") is not None:
        raise Unsupported("norm other than the 2-norm")
    x = bound["input"]
    tangent = _first(tangents, [x])
    dims = _dims([x, bound.get("dim")], {}, x.dim())
    if dims is None:
        dims = list(range(1, tangent.dim()))
    kept = out.reshape(1, *[1 if i + 1 in dims else s for i, s in enumerate(x.shape)])
    # d‖x‖ = ⟨x, dx⟩ / ‖x‖; 0 where ‖x‖ = 0, as torch does
    inner = (tangent * x).sum(dims, keepdim=True)
    return torch.where(kept == 0, 0.0, inner / kept).reshape(tangents.k, *out.shape)


def _amax(tangents, out, args, kwargs):
    # torch's convention: the tangent shared evenly among tied maxima.
    x = args[0]
    tangent = _first(tangents, [x])
    dims = _dims(args, kwargs, x.dim())
    if dims is None:
        dims = list(range(1, tangent.dim()))
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    kept = out if keepdim else out.reshape([1 if i + 1 in dims else s for i, s in enumerate(x.shape)])
    mask = (x == kept).to(tangent.dtype)
    return ((tangent * mask).sum(dims) / mask.sum([d - 1 for d in dims])).reshape(tangents.k, *out.shape)


def _rot90(tangents, out, args, kwargs):
    names = ("input", "k", "dims")
    bound = dict(zip(names, args)) | kwargs
    ndim = bound["input"].dim()
    dims = [d % ndim + 1 for d in bound.get("dims", (0, 1))]
    return torch.rot90(_first(tangents, [bound["input"]]), bound.get("k", 1), dims)


def _joined(stack: bool) -> Callable:
    """torch.cat / torch.stack: the parts' tangents joined the same way (zeros for constants)."""

    def rule(tangents, out, args, kwargs):
        parts = args[0]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if tangents.any_of(args[1:]) or not isinstance(parts, (list, tuple)):
            raise Unsupported("cat/stack of these arguments")
        ndim = parts[0].dim() + (1 if stack else 0)
        pieces = [tangents.get(p) if tangents.get(p) is not None else
                  torch.zeros(tangents.k, *p.shape, dtype=out.dtype, device=out.device) for p in parts]
        return (torch.stack if stack else torch.cat)(pieces, dim % ndim + 1)

    return rule


def _matmul(tangents, out, args, kwargs):
    a, b = args[0], args[1] if len(args) > 1 else kwargs["other"]
    if a.dim() < 2 or b.dim() < 2:
        raise Unsupported("matmul of vectors")
    ta, tb = tangents.get(a), tangents.get(b)
    # [k, ...] tangents broadcast against the other factor's batch dimensions
    terms = [None if ta is None else ta @ b, None if tb is None else a @ tb]
    return _sum_of(terms, tangents.k, out)


def max_pool2d(tangents, out, x, indices):
    tangent = _first(tangents, [x])
    if tangent.dim() != 5:
        raise Unsupported("max_pool2d of an unbatched input")
    k, b, c = tangent.shape[:3]
    flat = tangent.reshape(k, b, c, -1)
    index = indices.reshape(1, b, c, -1).expand(k, -1, -1, -1)
    return flat.gather(-1, index).reshape(k, *out.shape)


MAX_POOL_NAMES = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


def _tensor_methods(*names: str) -> list:
    return [getattr(torch.Tensor, n) for n in names if hasattr(torch.Tensor, n)]


def _table() -> tuple[dict, set]:
    """The rule of each function, and the rules that read an input-dependent ``other=`` keyword."""
    table: dict[Any, Callable] = {}
    reads_other: set = set()

    def put(funcs, rule, other=False):
        for f in funcs:
            table[f] = rule
        if other:
            reads_other.add(rule)

    put([F.linear], _linear)
    put([F.conv1d, torch.conv1d], _conv(F.conv1d))
    put([F.conv2d, torch.conv2d], _conv(F.conv2d))
    put([F.avg_pool2d], _linear_map(F.avg_pool2d))
    put([F.adaptive_avg_pool2d], _linear_map(F.adaptive_avg_pool2d))
    put([F.relu, torch.relu, torch.relu_, F.relu_, *_tensor_methods("relu", "relu_")], _relu)
    put([F.elu, F.elu_], _elu)
    put([F.leaky_relu], _leaky_relu)
    put([F.prelu, torch.prelu], _prelu)
    put([F.silu], _silu)
    put([torch.tanh, F.tanh, *_tensor_methods("tanh")], _tanh)
    put([torch.sigmoid, F.sigmoid, *_tensor_methods("sigmoid")], _sigmoid)
    put([F.batch_norm], _batch_norm)
    put([F.dropout, F.dropout2d], identity)  # without a draw: refused before the call otherwise
    put([torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
         *_tensor_methods("flatten", "reshape", "view", "squeeze", "unsqueeze")], _shaped)
    put([*_tensor_methods("contiguous", "clone"), torch.clone], identity)
    put([*_tensor_methods("detach", "new_zeros", "new_ones", "new_full", "new_empty", "new_tensor"), torch.detach,
         torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.rand_like, torch.randn_like],
        _constant)  # values that do not depend on the input's values
    for kind, names in (("add", ("add", "__add__", "__radd__", "add_", "__iadd__")),
                        ("sub", ("sub", "__sub__", "sub_", "__isub__")),
                        ("mul", ("mul", "__mul__", "__rmul__", "mul_", "__imul__")),
                        ("div", ("div", "__truediv__", "div_", "__itruediv__"))):
        put([getattr(torch, kind), *_tensor_methods(*names)], _binary(kind), other=True)
    put(_tensor_methods("__rsub__"), _rsub)
    put([torch.neg, *_tensor_methods("neg", "__neg__")], _neg)
    put([torch.sum, *_tensor_methods("sum")], _reduction("sum"))
    put([torch.mean, *_tensor_methods("mean")], _reduction("mean"))
    put([torch.norm, *_tensor_methods("norm")], _norm)
    put([torch.amax, *_tensor_methods("amax")], _amax)
    put([torch.rot90, *_tensor_methods("rot90")], _rot90)
    put([torch.cat, torch.concat], _joined(stack=False))
    put([torch.stack], _joined(stack=True))
    put([torch.matmul, *_tensor_methods("matmul", "__matmul__")], _matmul, other=True)
    return table, reads_other


RULES, READ_KEYWORD_TENSORS = _table()


#: Functional activations and dropout: the position of their ``inplace`` argument.
_INPLACE_ARGUMENT = {F.relu: 1, F.elu: 2, F.leaky_relu: 2, F.silu: 1, F.dropout: 3, F.dropout2d: 3}


def in_place(func, args, kwargs) -> bool:
    if not args or not isinstance(args[0], torch.Tensor):
        return False
    name = getattr(func, "__name__", "")
    if (name.endswith("_") and not name.endswith("__")) or name.startswith("__i"):
        return True  # relu_, add_, __iadd__, …
    position = _INPLACE_ARGUMENT.get(func)
    if position is None:
        return False
    return bool(args[position] if len(args) > position else kwargs.get("inplace", False))


def _batch_statistics(args, kwargs) -> bool:
    return bool(args[5] if len(args) > 5 else kwargs.get("training", False))


def _dropout_draws(args, kwargs) -> bool:
    training = args[2] if len(args) > 2 else kwargs.get("training", True)
    p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
    return bool(training) and p > 0


#: Calls refused before they run: batch norm with batch statistics (and its running-average
#: update), dropout that draws a mask.
REFUSED_BEFORE = {F.batch_norm: _batch_statistics, F.dropout: _dropout_draws, F.dropout2d: _dropout_draws}
