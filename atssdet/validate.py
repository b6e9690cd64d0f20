"""The one validation of values: thresholds, image sizes, counts, learning rate, device.

Every entry point checks its values here, so a value means the same and is refused with the same
message everywhere: the CLI (:func:`atssdet.cli.common.given` checks each flag the user gave by
its name), :class:`~atssdet.options.InferenceOptions`, :class:`~atssdet.detector.Detector`,
:func:`~atssdet.evaluation.evaluate`, :class:`~atssdet.config.ATSSConfig` (its sizes and
``basic_lr``, also when read from a checkpoint's metadata) and the HTTP server. A bad value raises
:class:`~atssdet.errors.OptionError` naming the value and the rule. No torch import at module level
(:func:`device` imports it when called).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

from atssdet.errors import OptionError

# The largest image side any size may ask for (a resize's short side or long-side cap; the zoo uses
# 800/1333). Sizes also arrive from files a user did not write (checkpoint and ONNX metadata):
# test_image_short_size=100000 would make a 320x240 image allocate ~22 GB.
MAX_IMAGE_SIDE = 8192


def _real(name: str, value: Any, rule: str) -> float:
    """``value`` as a float if it is a real number (not a bool), else OptionError citing ``rule``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptionError(f"{name} must be {rule}, got {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int beyond float range: out of every range checked here
        return math.inf


def _integer(name: str, value: Any, rule: str) -> int:
    """``value`` as an int if it is an integer (not a bool), else OptionError citing ``rule``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise OptionError(f"{name} must be {rule}, got {value!r}")
    return int(value)


def fraction(name: str, value: Any) -> float:
    """A finite number in ``[0, 1]`` (score and NMS thresholds, draw threshold)."""
    number = _real(name, value, "a number in [0, 1]")
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise OptionError(f"{name} must be a finite number in [0, 1], got {value!r}")
    return number


def count(name: str, value: Any, *, minimum: int = 1, maximum: int | None = None) -> int:
    """An integer (not a bool) ``>= minimum`` (and ``<= maximum`` when given)."""
    n = _integer(name, value, f"an integer >= {minimum}")
    if n < minimum:
        raise OptionError(f"{name} must be >= {minimum}, got {value!r}")
    if maximum is not None and n > maximum:
        raise OptionError(f"{name} must be <= {maximum}, got {value!r}")
    return n


def integers_in(name: str, value: Any, low: int, high: int) -> Any:
    """``value`` if it is an integer (not a bool) in ``[low, high]``, or a tuple of such integers (each
    checked: the training short sides, the FPN channels); else OptionError naming the field."""
    entries = value if isinstance(value, tuple) else (value,)
    for v in entries:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not low <= int(v) <= high:
            what = "integers" if isinstance(value, tuple) else "an integer"
            raise OptionError(f"{name}={value!r}: expected {what} in [{low}, {high}]")
    return value


def image_side(name: str, value: Any) -> int:
    """A resize target in pixels: an integer in ``[1, MAX_IMAGE_SIDE]`` (short side, long-side cap)."""
    return int(integers_in(name, value, 1, MAX_IMAGE_SIDE))


def positive_number(name: str, value: Any) -> float:
    """A finite number ``> 0`` (learning rate, timeouts)."""
    number = _real(name, value, "a finite number > 0")
    if not math.isfinite(number) or number <= 0:
        raise OptionError(f"{name} must be a finite number > 0, got {value!r}")
    return number


learning_rate = positive_number


# Device types atssdet runs on; torch parses others ("meta", "xla", ...) that cannot run a detector.
DEVICE_TYPES = ("cpu", "cuda", "mps")


def device(value: Any) -> Any:
    """``value`` (a ``str``/``torch.device`` or None = choose automatically) if torch parses it, its
    type is one of :data:`DEVICE_TYPES` and it is available on this machine; else :class:`OptionError`."""
    if value is None:
        return None
    import torch

    shown = value if isinstance(value, str) else str(value)  # "cuda:1", not "device(type='cuda', ...)"
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise OptionError(f"--device {shown!r}: not a valid device (cpu, cuda, cuda:N, ...)") from None
    if dev.type not in DEVICE_TYPES:
        raise OptionError(f"--device {shown!r}: atssdet runs on {', '.join(DEVICE_TYPES)}, not {dev.type!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"--device {shown!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OptionError(
                f"--device {shown!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
    if dev.type == "mps" and not (torch.backends.mps.is_built() and torch.backends.mps.is_available()):
        raise OptionError(f"--device {shown!r}: Apple MPS is not available on this machine")
    return value


def _at_least(minimum: int) -> Callable[[str, Any], int]:
    return lambda name, value: count(name, value, minimum=minimum)


# Rules by parameter name, as the library's keyword arguments (and the CLI's flag destinations) spell them.
RULES: dict[str, Callable[[str, Any], Any]] = {
    "score_threshold": fraction,
    "nms_threshold": fraction,
    "draw_threshold": fraction,
    "max_detections": count,
    "batch_size": count,
    "short_size": image_side,
    "max_size": image_side,
    "learning_rate": learning_rate,
    "device": lambda name, value: device(value),
    "max_iters": count,
    "checkpoint_every": count,
    "keep_checkpoints": count,
    "log_every": count,
    "eval_every": _at_least(0),
    "max_bad_images": _at_least(0),
    "num_workers": _at_least(0),
    "seed": _at_least(0),
    "dist_timeout": positive_number,
}


def check_values(**values: Any) -> dict[str, Any]:
    """Check each ``name=value`` whose name has a rule in :data:`RULES` (None = not given, skipped);
    returns ``values`` with the checked ones normalised (e.g. ints stay ints, thresholds become floats)."""
    out = dict(values)
    for name, value in values.items():
        rule = RULES.get(name)
        if rule is not None and value is not None:
            out[name] = rule(name, value)
    return out
