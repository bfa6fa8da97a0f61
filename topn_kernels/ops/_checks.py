"""Input validation shared by the public operators (docs/operators.md, Errors).

Every check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape, value or
device) with a message that names the argument, what was expected and what was received,
before any kernel runs. Checks that read tensor values (set sizes, lengths) run in eager mode
only: under ``torch.compile`` they would need a device sync and a graph break, so there the
kernels' own bounds checks are the safety net.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _eager() -> bool:
    return not torch.compiler.is_compiling()


def float_tensor(value: object, name: str, shape: str) -> Tensor:
    """A floating-point tensor whose number of dimensions matches ``shape`` (e.g. "(B, a)")."""
    ndim = _ndim(shape)
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape {shape}, got {type(value).__name__}"
        )
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {shape}, got shape {tuple(value.shape)}")
    return value


def float_tensors(values: Sequence[object], names: Sequence[str], shapes: Sequence[str]) -> None:
    """:func:`float_tensor` of each value, then one dtype and one device for all (the first's):
    the checks of several inputs in one pass (the per-call cost of small calls)."""
    for value, name, shape in zip(values, names, shapes, strict=True):
        if (
            not isinstance(value, Tensor)
            or value.dtype not in FLOAT_DTYPES
            or value.dim() != _ndim(shape)
        ):
            float_tensor(value, name, shape)  # raises, with the message
    dtype, device = values[0].dtype, values[0].device
    for value in values[1:]:
        if value.dtype != dtype or value.device != device:
            tensors = dict(zip(names, values, strict=True))
            same_dtype(tensors)
            same_device(tensors)


@functools.cache
def _ndim(shape: str) -> int:
    return shape.count(",") + 1


def dim_equal(name: str, shape: tuple[int, ...], axis: int, expected: int, what: str) -> None:
    if shape[axis] != expected:
        raise ValueError(
            f"{name} has shape {tuple(shape)}: its dim {axis} must equal {what} = {expected}"
        )


def same_dtype(tensors: dict[str, Tensor]) -> None:
    (first, ref), *rest = tensors.items()
    for name, t in rest:
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first} has {ref.dtype}: mixed dtypes")


def same_device(tensors: dict[str, Tensor]) -> None:
    (first, ref), *rest = tensors.items()
    for name, t in rest:
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {ref.device}")


def choice(value: object, name: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def integer(value: object, name: str, *, minimum: int | None = None) -> int:
    """``value`` as an int (a Python or numpy integer, or a SymInt; bool refused), checked
    against ``minimum`` in eager mode."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy ints are
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        value = operator.index(value)
    if minimum is not None and _eager() and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def output_length(value: object, name: str, rows: int, width: int, dtype: torch.dtype) -> None:
    """A padded length ``value`` whose output (rows, value, width) of ``dtype`` torch can
    allocate the size of (its bytes below 2^63), checked in eager mode."""
    if isinstance(value, int) and (
        value >= 2**63 or rows * value * width * dtype.itemsize >= 2**63
    ):
        raise ValueError(
            f"{name}={value} is too large: an output ({rows}, {value}, {width}) of {dtype} "
            f"has more than 2^63 bytes"
        )


def positive_number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return float(value)


def power_in_range(value: float, name: str, p: int, dtype: torch.dtype) -> float:
    """``value ** p`` is a normal, finite number of ``dtype`` (an entropic scale of Sinkhorn:
    outside that range its inverse overflows, and every value becomes NaN or inf)."""
    info = torch.finfo(dtype)
    try:
        power = value**p
    except OverflowError:
        power = math.inf
    if not (math.isfinite(value) and info.tiny <= power <= info.max):
        raise ValueError(
            f"{name} must be finite with {name}**p in [{info.tiny:.3g}, {info.max:.3g}] "
            f"(normal {dtype} numbers), got {name}={value} with p={p}"
        )
    return value


def integer_dtype(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` holds integers: not floating point, complex or bool."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def int_vector(value: Tensor, name: str, batch: int, device: torch.device) -> Tensor:
    """An integer tensor (B,) (or 0-d, broadcast) on ``device``, returned as int64 (B,)."""
    if not integer_dtype(value.dtype):
        raise TypeError(f"{name} must be an integer tensor, got dtype {value.dtype}")
    if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != batch):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the inputs are on {device}")
    if value.dtype == torch.int64 and value.dim() == 1 and value.is_contiguous():
        return value
    return value.to(torch.int64).expand(batch).contiguous()


def _bounds(name: str, lo: int, hi: int, low: int, high: int | None, high_name: str) -> None:
    """Raises unless [lo, hi] (the extremes of ``name``'s entries) lies in [low, high]."""
    if lo < low or (high is not None and hi > high):
        upper = "" if high is None else f", {high_name}={high}"
        raise ValueError(f"{name} must be in [{low}{upper}], got {lo if lo < low else hi}")


def values_in_range(value: Tensor, name: str, low: int, high: int | None, high_name: str) -> None:
    """Every entry of ``value`` in [low, high] (high None: no upper bound); eager mode only."""
    if _eager() and value.numel() > 0:
        lo, hi = torch.stack(torch.aminmax(value)).tolist()  # one host read
        _bounds(name, lo, hi, low, high, high_name)


def set_sizes(
    n: object,
    n_max: object,
    batch: int,
    upper: int | None,
    upper_name: str,
    device: torch.device,
    check_values: bool = True,
) -> tuple[Tensor, int]:
    """Set sizes ``n`` (int or integer tensor (B,)), each in [1, upper] (None: no upper bound),
    and the padded length ``n_max`` (default: the largest size; else >= every size).
    Returns (sizes int64 (B,), n_max). ``check_values=False`` leaves the checks that read a
    tensor ``n`` to a kernel that makes them itself (the native one)."""
    if isinstance(n, Tensor):
        sizes = int_vector(n, "n", batch, device)
        if n_max is not None:
            integer(n_max, "n_max", minimum=0)
        check = check_values and _eager()
        if batch == 0 or not (check or n_max is None):
            return sizes, 0 if n_max is None else n_max
        lo, hi = torch.stack(torch.aminmax(sizes)).tolist()  # one reduction, one host read
        if check or n_max is None:  # the values are read already: the checks cost nothing
            _bounds("n", lo, hi, 1, upper, upper_name)
        n_max = hi if n_max is None else n_max
        if check:
            _bounds("n", lo, hi, 1, n_max, "n_max")
        return sizes, n_max
    n_max = fixed_size(n, n_max, upper, upper_name)
    return torch.full((batch,), n, dtype=torch.int64, device=device), n_max


def fixed_size(n: object, n_max: object, upper: int | None, upper_name: str) -> int:
    """One size ``n`` (an int) for every set, in [1, upper], and the padded length ``n_max``
    (default n; else >= n); returns n_max."""
    n = integer(n, "n")
    eager = _eager()
    if eager:
        _bounds("n", n, n, 1, upper, upper_name)
    if n_max is None:
        return n
    if eager and integer(n_max, "n_max") < n:
        raise ValueError(f"n_max must be >= n = {n}, got {n_max}")
    return n_max
