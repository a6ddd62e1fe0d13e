"""Engines that run a codes computation: torch itself, or OpenVINO's compiled CPU network.

An engine turns a batch of uint8 images ``(n, 3, H, W)`` into the codes of a
:class:`~sklearn_transfer.computation.CodesComputation`, as a float32 array
(``engine(images)``), or a stream of batches into a stream of codes, in order
(``engine.map(batches)``, what the estimators use).

* ``"torch"``: the network in eager mode (channels-last, autocast to the
  computation's precision). Runs on every device.
* ``"openvino"``: the same module converted by OpenVINO and compiled for the
  CPU, in float32, or in bfloat16 on CPUs that have it. Conversion takes
  seconds; given a directory (the feature cache's), the converted network is
  kept there with the SHA-256 of its files, checked when a later process
  reads it. It is compiled for throughput: one stream per core, each running
  a batch on its own (OpenVINO's ``AsyncInferQueue``), so that ``map`` keeps
  a batch per stream in flight and a core busy decoding images holds up one
  batch, not every layer of all of them.
* ``"openvino"`` with ``precision="int8"``: that network quantized by NNCF
  (OpenVINO's post-training quantization) on calibration images, the
  remaining layers at the CPU's native precision. Opt-in: never chosen by
  ``"auto"``.

:func:`resolve_engine` decides what ``engine="auto"`` means;
:func:`engine_for` gives the engine of a computation on a device, built once
per process.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import shutil
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
from sklearn_transfer.files import FormatError, check_format, format_tag, sha256_file
from sklearn_transfer.identity import fingerprint
from sklearn_transfer.openvino_runtime import INFERENCE_PRECISION, core, import_quietly
from sklearn_transfer.runtime import Runtime, native_precision, usable_cores

__all__ = ["ENGINES", "EngineUnavailableError", "OpenVINOEngine", "TorchEngine",
           "available_engines", "convert", "engine_for", "import_openvino", "resolve_engine"]

ENGINES = ("auto", "torch", "openvino")


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
        usable = cpu and runtime.precision in INFERENCE_PRECISION
        return "openvino" if usable and "openvino" in available_engines() else "torch"
    if engine == "openvino":
        if not cpu:
            raise ValueError(f"engine='openvino' runs on the CPU, not on {runtime.device}; "
                             "use engine='torch' (or 'auto') for this device")
        if runtime.precision not in INFERENCE_PRECISION:
            raise ValueError(f"engine='openvino' runs precision 'float32' or 'bfloat16', not "
                             f"{runtime.precision!r}")
    return engine


# ----------------------------------------------------------------------- the engines


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


class OpenVINOEngine:
    """The computation converted by OpenVINO and compiled for the CPU.

    Parameters
    ----------
    computation : CodesComputation
    network : Backbone
        Converted (traced once on a small example batch) unless ``directory``
        holds the converted form already.
    directory : path-like, optional
        Where converted networks are kept between processes
        (``<directory>/engines/openvino-<key>/``); the feature cache's directory.

    Raises
    ------
    EngineUnavailableError
        When OpenVINO is missing or cannot convert the network.
    """

    def __init__(self, computation: CodesComputation, network: nn.Module,
                 directory: str | os.PathLike | None = None,
                 calibration: Iterable[torch.Tensor] | None = None) -> None:
        ov = import_openvino()
        model = _read_converted(ov, computation, directory)
        if model is None:
            model = convert(ov, computation, network)
            if computation.precision == "int8":
                model = _quantize(model, computation, calibration)
        # torch.set_num_threads is the one knob for both engines: a Dask worker sharing the
        # cores with others lowers it, and OpenVINO would otherwise take every core
        threads = torch.get_num_threads()
        self.compiled = core().compile_model(model, "CPU", {
            # int8: the layers left unquantized at the CPU's native precision
            "INFERENCE_PRECISION_HINT": INFERENCE_PRECISION.get(
                computation.precision, INFERENCE_PRECISION[native_precision(torch.device("cpu"))]),
            "PERFORMANCE_HINT": "THROUGHPUT",  # streams: a batch per core (see map)
            "INFERENCE_NUM_THREADS": threads,
            # pinned threads of processes sharing the cores (Dask workers) would all
            # land on the first ones (Intel KB 000058227): pin only when given them all
            "ENABLE_CPU_PINNING": threads >= usable_cores(),
        })
        self.streams = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.model, self.computation, self._ov = model, computation, ov
        self.keep(directory)

    def keep(self, directory: str | os.PathLike | None) -> None:
        """Keep the converted network in ``directory`` for later processes, unless it is there."""
        if directory is not None and not _converted_dir(self.computation, directory).is_dir():
            _keep_converted(self._ov, self.model, self.computation, directory)

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        ((codes, _),) = self.map([(images, None)])
        return codes

    def map(self, batches: Iterable[tuple[torch.Tensor, Any]]) -> Iterator[tuple[np.ndarray, Any]]:
        """``(codes, tag)`` of each ``(images, tag)`` batch, in order, one batch per stream
        in flight while the next ones are read."""
        # a queue of this call only (its requests cost microseconds): threads sharing the
        # engine never share a request, and a failed request does not outlive the call
        queue = self._ov.AsyncInferQueue(self.compiled, self.streams)
        done: dict[int, np.ndarray] = {}
        # a copy: the request's output buffer is overwritten by its next batch
        queue.set_callback(lambda request, i: done.__setitem__(
            i, np.array(request.get_output_tensor(0).data, dtype=np.float32)))
        waiting: deque = deque()
        try:
            for i, (images, tag) in enumerate(batches):
                queue.start_async([images.numpy()], userdata=i)  # waits for an idle request
                waiting.append((i, tag))
                while waiting and waiting[0][0] in done:
                    j, first = waiting.popleft()
                    yield done.pop(j), first
            queue.wait_all()
            while waiting:
                j, tag = waiting.popleft()
                yield done.pop(j), tag
        finally:  # left early (an error, a break): no request may outlive the call
            with contextlib.suppress(RuntimeError):  # the error in flight is the one to see
                queue.wait_all()
            # freed now, while the compiled network lives: an error's traceback keeps this
            # frame, whose locals would otherwise be freed in an order that may free the
            # network (this engine, evicted from the memo) before its requests
            del queue


# --------------------------------------------------------------------- one per process

#: engines of this process, by computation key, device and threads; a few at most, as each
#: holds a network (tens of MB): enough for a grid search's stage choices, a fine-tuning's
#: frozen prefix and predictor, and an int8 network, which cannot be rebuilt without its
#: calibration images once evicted (unless kept in a feature cache directory)
_ENGINES: OrderedDict[tuple[str, str, int], TorchEngine | OpenVINOEngine] = OrderedDict()
_KEEP = 8
# torch's tracer is not thread-safe, and one conversion per computation is enough
_BUILDING = threading.Lock()


def engine_for(computation: CodesComputation, device: str | torch.device = "auto",
               network: nn.Module | None = None,
               directory: str | os.PathLike | None = None,
               calibration: Iterable[torch.Tensor] | None = None,
               ) -> TorchEngine | OpenVINOEngine:
    """The engine ``computation.engine`` names, on ``device``, built once per process.

    Parameters
    ----------
    computation : CodesComputation
    device : str or torch.device, default="auto"
    network : Backbone, optional
        The network to run. Default: built from the computation
        (:meth:`~sklearn_transfer.computation.CodesComputation.network`) and
        checked against its fingerprint (a worker whose packages build another
        network is refused).
    directory : path-like, optional
        Where OpenVINO keeps converted networks between processes.
    calibration : iterable of uint8 image batches, optional
        What an int8 computation is quantized on, when this process has not
        quantized it yet and ``directory`` does not hold it.

    Raises
    ------
    EngineUnavailableError
        When OpenVINO is missing or cannot convert the network, or an int8
        computation has neither its quantized network nor calibration images.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sklearn_transfer import Backbone, DataConfig
    >>> from sklearn_transfer.computation import CodesComputation
    >>> from sklearn_transfer.engines import engine_for
    >>> net = Backbone([("conv", nn.Conv2d(3, 8, 3))], DataConfig(input_size=32))
    >>> c = CodesComputation.of(net, stages=[0], engine="torch")
    >>> engine = engine_for(c, "cpu", net)
    >>> engine(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape
    (2, 8)
    """
    # an int8 computation runs in OpenVINO only: the torch side of the runtime is unused
    runtime = Runtime.from_device(
        device, "float32" if computation.precision == "int8" else computation.precision)
    slot = (computation.key, str(runtime.device), torch.get_num_threads())
    with _BUILDING:
        if slot not in _ENGINES:
            if network is None:
                network = _built(computation)
            _ENGINES[slot] = (OpenVINOEngine(computation, network, directory, calibration)
                              if computation.engine == "openvino"
                              else TorchEngine(computation, network, runtime))
            while len(_ENGINES) > _KEEP:
                _ENGINES.popitem(last=False)
        _ENGINES.move_to_end(slot)
        engine = _ENGINES[slot]
        if isinstance(engine, OpenVINOEngine):  # built for a caller without a directory
            engine.keep(directory)
        return engine


def _built(computation: CodesComputation) -> nn.Module:
    """The computation's network built here, refused unless it is the one fingerprinted."""
    network = computation.network().eval()
    if isinstance(computation.backbone, str) and fingerprint(network) != computation.fingerprint:
        raise RuntimeError(
            f"this process builds another {computation.name} network than the one the codes "
            "were defined with (other weights or package versions installed here); install "
            "the same versions everywhere")
    return network


# ------------------------------------------------------------------- OpenVINO's files


def import_openvino() -> Any:
    """OpenVINO, imported without telemetry (:class:`EngineUnavailableError` if missing)."""
    try:
        return import_quietly("openvino", "OpenVINO is not installed")
    except ImportError as exc:
        raise EngineUnavailableError(str(exc)) from None


def convert(ov: Any, computation: Any, network: nn.Module) -> Any:
    """``computation.extractor(network)`` as an OpenVINO model, checked against torch on an
    example batch of ``computation.data_config.input_size`` images.

    The one conversion of the library: codes, a fine-tuning's frozen stages and
    predictions, and exported models go through it.

    Raises
    ------
    EngineUnavailableError
        OpenVINO cannot convert the module, or computes other outputs than torch.
    """
    size = computation.data_config.input_size
    # images in [0, 255]: uint8 unless the computation takes floats (mixed training images)
    example = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(0)).to(
        getattr(computation, "input_dtype", torch.uint8))
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
        got = core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(
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


def _quantize(model: Any, computation: CodesComputation,
              calibration: Iterable[torch.Tensor] | None) -> Any:
    """``model`` quantized to int8 by NNCF on the calibration batches."""
    if calibration is None:
        raise EngineUnavailableError(
            f"the int8 network of {computation.name} is neither in this process nor kept on "
            "disk, and quantizing it needs the calibration images of fit: fit the transformer "
            "again here, or give it memory=... so that the quantized network is kept")
    nncf = import_quietly("nncf", "precision='int8' needs NNCF: pip install "
                                   "'sklearn-transfer[int8]'")
    batches = [b.numpy() for b in calibration]
    # subset_size counts the dataset's items, here batches: every one of them
    return nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches))


_FILES = ("network.xml", "network.bin")


def _converted_dir(computation: CodesComputation, directory: str | os.PathLike) -> Path:
    return Path(directory).expanduser() / "engines" / f"openvino-{computation.key}"


def _read_converted(ov: Any, computation: CodesComputation,
                    directory: str | os.PathLike | None) -> Any:
    """The converted network kept in ``directory``, if it is there whole and unchanged."""
    if directory is None:
        return None
    folder = _converted_dir(computation, directory)
    if not folder.is_dir():
        return None
    try:
        meta = json.loads((folder / "network.json").read_text())
        check_format("converted-network", meta.get("format"), folder, "converting it again")
        for name in _FILES:
            if sha256_file(folder / name) != meta["sha256"][name]:
                raise FormatError(f"{str(folder / name)!r} is not the file converted (its "
                                  "SHA-256 differs: damaged or edited)")
        return core().read_model(folder / "network.xml")
    except Exception as exc:  # damaged, cut short, edited: convert again, never trust it
        reason = " ".join(str(exc).split())[-200:]
        warnings.warn(f"the converted network in {str(folder)!r} cannot be used (…{reason}); "
                      "converting it again", RuntimeWarning, stacklevel=5)
        shutil.rmtree(folder, ignore_errors=True)
        return None


def _keep_converted(ov: Any, model: Any, computation: CodesComputation,
                    directory: str | os.PathLike) -> None:
    """Save the converted network and its digests; renaming its folder makes it appear whole."""
    final = _converted_dir(computation, directory)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
        ov.save_model(model, tmp / "network.xml", compress_to_fp16=False)
        (tmp / "network.json").write_text(json.dumps({
            "format": format_tag("converted-network"),
            "sha256": {name: sha256_file(tmp / name) for name in _FILES}}))
        try:
            tmp.rename(final)
        except OSError:  # another process kept it first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:  # a full or read-only disk costs a conversion next time, no more
        warnings.warn(f"could not keep the converted network in {str(final.parent)!r} ({exc})",
                      RuntimeWarning, stacklevel=5)
