"""OpenVINO in this process: imported without its telemetry, with one ``Core``.

The engines (which convert and compile networks, :mod:`sklearn_transfer.engines`)
and the loader of exported models (which runs without torch,
:mod:`sklearn_transfer.exported`) both go through here, so that a process
has one ``Core`` whichever of them it uses.
"""

from __future__ import annotations

import functools
import importlib
import sys
from typing import Any

__all__ = ["INFERENCE_PRECISION", "core", "import_quietly"]

#: OpenVINO's inference precisions, by torch's names (float16 needs AVX512-FP16/AMX-FP16 CPUs)
INFERENCE_PRECISION = {"float32": "f32", "bfloat16": "bf16"}


def import_quietly(name: str, missing: str) -> Any:
    """Import OpenVINO or NNCF without their usage telemetry (or raise ``ImportError(missing)``).

    Both send usage events to Google Analytics through ``openvino_telemetry``
    when it is installed; hidden while they are imported, they use their stubs.

    Examples
    --------
    >>> from sklearn_transfer.openvino_runtime import import_quietly
    >>> import_quietly("no_such_module", "no such module")
    Traceback (most recent call last):
    ...
    ImportError: no such module (No module named 'no_such_module')
    """
    blocked = "openvino_telemetry" not in sys.modules
    if blocked:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(f"{missing} ({exc})") from None
    finally:
        if blocked:
            del sys.modules["openvino_telemetry"]


@functools.cache
def core() -> Any:
    """The process's one OpenVINO ``Core`` (``ImportError`` without OpenVINO).

    A compiled network freed after the Core that made it can crash OpenVINO's
    CPU plugin later (as in ultralytics/ultralytics#25864): one Core lives as
    long as the process.
    """
    return import_quietly("openvino", "OpenVINO is not installed").Core()
