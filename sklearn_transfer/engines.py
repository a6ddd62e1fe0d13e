"""Engines that run a codes computation: torch itself, or OpenVINO's compiled CPU network.

An engine turns a batch of uint8 images ``(n, 3, H, W)`` into the codes of a
:class:`~sklearn_transfer.computation.CodesComputation`, as a float32 array
(``engine(images)``), or a stream of batches into a stream of codes, in order
(``engine.map(batches)``, what the estimators use).

* ``"torch"``: the network in eager mode (channels-last, autocast to the
  computation's precision). Runs on every device.
* ``"openvino"``: the same module converted once by OpenVINO and compiled
  for the CPU, where it runs faster than torch eager, in float32 and in
  bfloat16 on CPUs that have it (README's throughput table). Conversion takes seconds:
  its result is kept for the process and, given a directory (the feature
  cache's), on disk for later processes. It is compiled for throughput: one
  stream per core, each running a batch on its own, so that ``map`` keeps a
  batch per stream in flight and a core busy decoding images holds up one
  batch, not every layer of all of them.

:func:`resolve_engine` decides what ``engine="auto"`` means;
:func:`build_engine` builds one.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import shutil
import sys
import tempfile
import threading
import warnings
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sklearn_transfer.computation import CodesComputation
from sklearn_transfer.runtime import Runtime, usable_cores

__all__ = ["ENGINES", "EngineUnavailableError", "TorchEngine", "OpenVINOEngine",
           "available_engines", "build_engine", "resolve_engine"]

ENGINES = ("auto", "torch", "openvino")
#: OpenVINO's inference precisions, by torch's names (float16 needs AVX512-FP16/AMX-FP16 CPUs)
_OV_PRECISION = {"float32": "f32", "bfloat16": "bf16"}


class EngineUnavailableError(RuntimeError):
    """An engine could not be imported or could not convert the network."""


def available_engines() -> list[str]:
    """The engines that can run here (their packages are installed).

    Examples
    --------
    >>> from sklearn_transfer.engines import available_engines
    >>> "torch" in available_engines()
    True
    """
    found = ["torch"]
    with contextlib.suppress(ImportError, ValueError):  # ValueError: a module set to None
        if importlib.util.find_spec("openvino") is not None:
            found.append("openvino")
    return found


def resolve_engine(engine: str, runtime: Runtime) -> str:
    """What ``engine`` means on ``runtime``'s device and precision.

    ``"auto"`` is OpenVINO on the CPU when it is installed and supports the
    precision, torch otherwise (on CUDA torch runs float16 natively).

    Raises
    ------
    ValueError
        For ``engine="openvino"`` on a non-CPU device, or with a precision
        OpenVINO does not run.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is not one of {ENGINES}")
    cpu = runtime.device.type == "cpu"
    if engine == "auto":
        usable = cpu and runtime.precision in _OV_PRECISION
        return "openvino" if usable and "openvino" in available_engines() else "torch"
    if engine == "openvino":
        if not cpu:
            raise ValueError(f"engine='openvino' runs on the CPU, not on {runtime.device}; "
                             "use engine='torch' (or 'auto') for this device")
        if runtime.precision not in _OV_PRECISION:
            raise ValueError(f"engine='openvino' runs precision 'float32' or 'bfloat16', not "
                             f"{runtime.precision!r}")
    return engine


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Inference-mode activations (BatchNorm's running statistics), then the modes as they were.

    On the CPU the torch engine runs the transformer's ``backbone_`` itself,
    which a caller may have switched to training mode.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class TorchEngine:
    """The computation's extractor in torch eager mode, on ``runtime``'s device.

    Parameters
    ----------
    computation : CodesComputation
    network : Backbone
        Run as it is on the CPU; copied to another device.
    runtime : Runtime
    """

    def __init__(self, computation: CodesComputation, network: nn.Module,
                 runtime: Runtime) -> None:
        if runtime.device.type != "cpu":
            network = copy.deepcopy(network)
        self.runtime = runtime
        self.module = computation.extractor(network).to(runtime.device,
                                                        memory_format=torch.channels_last)

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        with torch.inference_mode(), self.runtime.autocast(), _eval_mode(self.module):
            codes = self.module(self.runtime.to_device(images))
        return codes.float().cpu().numpy()

    def map(self, batches: Iterable[tuple[torch.Tensor, Any]]) -> Iterator[tuple[np.ndarray, Any]]:
        """``(codes, tag)`` of each ``(images, tag)`` batch, in order."""
        for images, tag in batches:
            yield self(images), tag


#: (converted model, compiled model) of this process, by computation key and threads
_COMPILED: OrderedDict[tuple[str, int], tuple[Any, Any]] = OrderedDict()
_KEEP = 4
_COMPILING = threading.Lock()


class OpenVINOEngine:
    """The computation converted by OpenVINO and compiled for the CPU.

    Parameters
    ----------
    computation : CodesComputation
    network : Backbone
        Converted (traced once on a small example batch) unless this process
        or ``directory`` already holds the converted form.
    directory : path-like, optional
        Where converted networks are kept between processes
        (``<directory>/engines/openvino-<key>/``); the feature cache's directory.

    Raises
    ------
    EngineUnavailableError
        When OpenVINO is missing or cannot convert the network.
    """

    def __init__(self, computation: CodesComputation, network: nn.Module,
                 directory: str | os.PathLike | None = None) -> None:
        # torch.set_num_threads is the one knob for both engines: a Dask worker sharing the
        # cores with others lowers it, and OpenVINO would otherwise take every core
        slot = (computation.key, torch.get_num_threads())
        with _COMPILING:  # torch's tracer is not thread-safe, and one conversion is enough
            if slot not in _COMPILED:
                ov = _import_openvino()
                # converted already for another thread count: only compile again
                model = next((held[0] for (key, _), held in _COMPILED.items()
                              if key == computation.key), None)
                if model is None:
                    model = _read_converted(ov, computation, directory)
                if model is None:
                    model = _convert(ov, computation, network)
                compiled = ov.Core().compile_model(model, "CPU", {
                    "INFERENCE_PRECISION_HINT": _OV_PRECISION[computation.precision],
                    "PERFORMANCE_HINT": "THROUGHPUT",  # streams: a batch per core (see map)
                    "INFERENCE_NUM_THREADS": slot[1],
                    # pinned threads of processes sharing the cores (Dask workers) would all
                    # land on the first ones (Intel KB 000058227): pin only when given them all
                    "ENABLE_CPU_PINNING": slot[1] >= usable_cores(),
                })
                _COMPILED[slot] = (model, compiled)
                while len(_COMPILED) > _KEEP:
                    _COMPILED.popitem(last=False)
            _COMPILED.move_to_end(slot)
            model, compiled = _COMPILED[slot]
        if directory is not None and not _converted_dir(computation, directory).is_dir():
            _keep_converted(_import_openvino(), model, computation, directory)
        self.compiled = compiled
        self.streams = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        ((codes, _),) = self.map([(images, None)])
        return codes

    def map(self, batches: Iterable[tuple[torch.Tensor, Any]]) -> Iterator[tuple[np.ndarray, Any]]:
        """``(codes, tag)`` of each ``(images, tag)`` batch, in order, one batch per stream
        in flight while the next ones are read."""
        # requests of this call only (microseconds each): threads sharing the engine never
        # share one
        idle = [self.compiled.create_infer_request() for _ in range(self.streams)]
        running: deque = deque()
        try:
            for images, tag in batches:
                if not idle:
                    yield _result(*running.popleft(), idle)
                request = idle.pop()
                request.start_async([images.numpy()])  # copied in: the batch may go
                running.append((request, tag))
            while running:
                yield _result(*running.popleft(), idle)
        finally:  # left early (an error, a break): no request may outlive the call
            for request, _ in running:
                with contextlib.suppress(RuntimeError):  # the error in flight is the one to see
                    request.wait()


def _result(request: Any, tag: Any, idle: list) -> tuple[np.ndarray, Any]:
    """Wait for ``request``, copy out its codes and hand it back to ``idle``."""
    request.wait()
    # a copy: the request's output buffer is overwritten by its next batch
    codes = np.array(request.get_output_tensor(0).data, dtype=np.float32)
    idle.append(request)
    return codes, tag


def _import_openvino() -> Any:
    try:
        # ``import openvino`` loads its converter, whose telemetry would start a process that
        # sends usage events to Google Analytics; without the telemetry package it uses its stub
        blocked = "openvino_telemetry" not in sys.modules
        if blocked:
            sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]
        try:
            import openvino
        finally:
            if blocked:
                del sys.modules["openvino_telemetry"]
    except ImportError as exc:
        raise EngineUnavailableError(f"OpenVINO is not installed ({exc})") from None
    return openvino


def _convert(ov: Any, computation: CodesComputation, network: nn.Module) -> Any:
    """The extractor as an OpenVINO model, checked against torch on an example batch."""
    size = computation.data_config.input_size
    example = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(0))
    module = computation.extractor(network)
    try:
        with warnings.catch_warnings(), torch.no_grad(), _eval_mode(module):
            # a trace that depends on the data (Python control flow) would be wrong for
            # other images: refuse it; torch's deprecation of TorchScript is OpenVINO's concern
            warnings.simplefilter("error", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            model = ov.convert_model(module, example_input=example, input=[(-1, 3, size, size)])
            expected = module(example).float().numpy()
        got = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(
            example.numpy())[0]
    except Exception as exc:  # its converter raises many types: say which network failed
        message = " ".join(str(exc).split())[:300]
        raise EngineUnavailableError(
            f"OpenVINO could not convert {computation.name} ({type(exc).__name__}: {message})"
        ) from exc
    error = float(np.abs(got - expected).max()) if got.shape == expected.shape else np.inf
    if not error <= 1e-4 * max(1.0, float(np.abs(expected).max())):
        raise EngineUnavailableError(
            f"OpenVINO's conversion of {computation.name} computes other codes than torch "
            f"(max abs difference {error:.3g} on an example batch)")
    return model


def _converted_dir(computation: CodesComputation, directory: str | os.PathLike) -> Path:
    return Path(directory).expanduser() / "engines" / f"openvino-{computation.key}"


def _read_converted(ov: Any, computation: CodesComputation,
                    directory: str | os.PathLike | None) -> Any:
    if directory is None:
        return None
    xml = _converted_dir(computation, directory) / "network.xml"
    if not xml.is_file():
        return None
    try:
        return ov.Core().read_model(xml)
    except Exception as exc:  # damaged: convert again
        reason = " ".join(str(exc).split())[-200:]
        warnings.warn(f"the converted network {str(xml)!r} cannot be read (…{reason}); "
                      "converting it again", RuntimeWarning, stacklevel=4)
        shutil.rmtree(xml.parent, ignore_errors=True)
        return None


def _keep_converted(ov: Any, model: Any, computation: CodesComputation,
                    directory: str | os.PathLike) -> None:
    """Save the converted network; renaming its folder into place makes it appear whole."""
    final = _converted_dir(computation, directory)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
        ov.save_model(model, tmp / "network.xml", compress_to_fp16=False)
        try:
            tmp.rename(final)
        except OSError:  # another process kept it first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:  # a full or read-only disk costs a conversion next time, no more
        warnings.warn(f"could not keep the converted network in {str(final.parent)!r} ({exc})",
                      RuntimeWarning, stacklevel=4)


def build_engine(computation: CodesComputation, network: nn.Module, runtime: Runtime,
                 directory: str | os.PathLike | None = None) -> TorchEngine | OpenVINOEngine:
    """The engine ``computation.engine`` names, running ``network``.

    Parameters
    ----------
    computation : CodesComputation
    network : Backbone
    runtime : Runtime
        Device of the torch engine.
    directory : path-like, optional
        Where OpenVINO keeps converted networks between processes.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sklearn_transfer import Backbone, DataConfig
    >>> from sklearn_transfer.computation import CodesComputation
    >>> from sklearn_transfer.engines import build_engine
    >>> from sklearn_transfer.runtime import Runtime
    >>> net = Backbone([("conv", nn.Conv2d(3, 8, 3))], DataConfig(input_size=32))
    >>> c = CodesComputation.of(net, stages=[0], engine="torch")
    >>> engine = build_engine(c, net, Runtime.from_device("cpu", "float32"))
    >>> engine(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape
    (2, 8)
    """
    if computation.engine == "openvino":
        return OpenVINOEngine(computation, network, directory)
    return TorchEngine(computation, network, runtime)
