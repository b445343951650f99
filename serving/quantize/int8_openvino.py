"""INT8 for OpenVINO: NNCF post-training quantization of the IR."""

from __future__ import annotations

import numpy as np
import openvino as ov

from serving.runtimes.signal_stack import keep_signal_stack


def quantize_int8(model: ov.Model, calibration: np.ndarray) -> ov.Model:
    import nncf  # deferred: heavy import, and it must never reach a Locust process

    dataset = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
    with keep_signal_stack():  # NNCF compiles on CPU plugins of its own: see signal_stack.py
        return nncf.quantize(
            model,
            dataset,
            preset=nncf.QuantizationPreset.MIXED,
            subset_size=len(calibration),
        )
