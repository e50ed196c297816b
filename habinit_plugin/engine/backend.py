"""Array backend: NumPy on the CPU or CuPy on an NVIDIA GPU.

Numerical code is written once against an array namespace ``xp``. Functions take
the namespace from their input arrays (:func:`array_module`), so the same code runs
on host or device arrays. The device is chosen once per run with :func:`get_xp`;
host arrays go to the device through :func:`to_device` (pinned buffers on a GPU).
"""

from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import Any

import numpy as np

DEVICES = ("cpu", "gpu", "auto")


class DeviceError(RuntimeError):
    """The requested compute device cannot be used."""


def cpu_workers() -> int:
    """Threads for CPU FFTs: ``HABINIT_THREADS`` or every core this process may use."""
    env = os.environ.get("HABINIT_THREADS")
    if env:
        return max(1, int(env))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def _import_cupy() -> ModuleType | None:
    try:
        import cupy  # noqa: PLC0415
    except Exception:  # ImportError, or a CUDA library that fails to load
        return None
    return cupy


def gpu_available() -> bool:
    cupy = _import_cupy()
    if cupy is None:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def get_xp(device: str = "cpu") -> ModuleType:
    """Array namespace for ``device`` ('cpu', 'gpu' or 'auto').

    'gpu' raises :class:`DeviceError` with the reason when CuPy or a GPU is missing;
    'auto' falls back to NumPy.
    """
    if device not in DEVICES:
        raise DeviceError(f"--device must be one of {', '.join(DEVICES)}, not {device!r}")
    if device == "cpu":
        return np
    cupy = _import_cupy()
    if cupy is not None and gpu_available():
        return cupy
    if device == "auto":
        return np
    if cupy is None:
        raise DeviceError(
            "--device gpu was requested but CuPy is not installed in this Python "
            f"({sys.executable}); install the 'gpu' extra or run with --device cpu"
        )
    raise DeviceError(
        "--device gpu was requested but no CUDA GPU is visible "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); "
        "run with --device cpu"
    )


def array_module(*arrays) -> ModuleType:
    """The namespace (numpy or cupy) of the given arrays."""
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        return cupy.get_array_module(*arrays)
    return np


def is_cupy(xp) -> bool:
    """True when ``xp`` is the CuPy module."""
    return xp is not np and getattr(xp, "__name__", "") == "cupy"


def to_numpy(x) -> np.ndarray:
    """A host NumPy copy (or view) of a NumPy or CuPy array."""
    if isinstance(x, np.ndarray):
        return x
    get = getattr(x, "get", None)
    return get() if get is not None else np.asarray(x)


def device_name(xp: ModuleType) -> str:
    if xp is np:
        return f"cpu ({cpu_workers()} threads)"
    props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
    name = props["name"]
    return "gpu " + (name.decode() if isinstance(name, bytes) else str(name))


def fft_module(xp: ModuleType) -> ModuleType:
    """``scipy.fft`` for NumPy, ``cupyx.scipy.fft`` for CuPy."""
    if xp is np:
        import scipy.fft  # noqa: PLC0415

        return scipy.fft
    import cupyx.scipy.fft  # noqa: PLC0415

    return cupyx.scipy.fft


def fft_kwargs(xp: ModuleType) -> dict:
    """Extra keyword arguments for the FFT calls of ``xp`` (CPU threads)."""
    return {"workers": cpu_workers()} if xp is np else {}


def scatter_add(target, index, values) -> None:
    """``target[index] += values`` in place, with repeated indices summed.

    target: 1-D real or complex array; index: 1-D integer array; values: 1-D, same kind.
    """
    xp = array_module(target)
    if xp is np:
        np.add.at(target, index, values)
    elif xp.iscomplexobj(target):  # cupy.add.at takes real types only: add real and imaginary parts
        pairs = target.view(target.real.dtype)
        index = 2 * xp.asarray(index, dtype=xp.int64)
        xp.add.at(pairs, index, xp.ascontiguousarray(values.real, dtype=pairs.dtype))
        xp.add.at(pairs, index + 1, xp.ascontiguousarray(values.imag, dtype=pairs.dtype))
    else:
        xp.add.at(target, index, values)


class _PinnedStager:
    """Two reusable page-locked host buffers; a copy waits for the buffer's previous copy."""

    def __init__(self, cupy):
        self.cupy = cupy
        self.buffers: list[np.ndarray | None] = [None, None]
        self.events: list[Any] = [None, None]
        self.turn = 0

    def copy(self, host: np.ndarray):
        cupy = self.cupy
        k = self.turn
        self.turn ^= 1
        if self.events[k] is not None:
            self.events[k].synchronize()  # the previous copy out of this buffer is done
        buf = self.buffers[k]
        if buf is None or buf.nbytes < host.nbytes:
            import cupyx  # noqa: PLC0415

            buf = cupyx.empty_pinned((max(host.nbytes, 1 << 20),), dtype=np.uint8)
            self.buffers[k] = buf
        view = buf[: host.nbytes].view(host.dtype).reshape(host.shape)
        np.copyto(view, host)
        out = cupy.empty(host.shape, dtype=host.dtype)
        stream = cupy.cuda.get_current_stream()
        out.set(view, stream=stream)
        self.events[k] = stream.record()
        return out


_STAGER: _PinnedStager | None = None
_PINNED_MIN_BYTES = 1 << 20


def to_device(host_array, xp):
    """``host_array`` on the device of ``xp``: the identity on NumPy (``np.asarray``).

    On a GPU, arrays of 1 MB or more go through one of two reusable pinned buffers
    (page-locked memory, copied asynchronously on the current stream); smaller ones and
    arrays already on the device go through ``xp.asarray``.
    """
    if not is_cupy(xp):
        return np.asarray(host_array)
    if isinstance(host_array, xp.ndarray):
        return host_array
    host = np.ascontiguousarray(host_array)
    if host.nbytes < _PINNED_MIN_BYTES or host.dtype == object:
        return xp.asarray(host)
    global _STAGER
    if _STAGER is None:
        _STAGER = _PinnedStager(xp)
    return _STAGER.copy(host)
