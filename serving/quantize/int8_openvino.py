"""INT8 for OpenVINO: NNCF post-training quantization of the IR."""

from __future__ import annotations

import numpy as np
import openvino as ov


def quantize_int8(model: ov.Model, calibration: np.ndarray) -> ov.Model:
    import nncf  # deferred: heavy import, and it must never reach a Locust process

    dataset = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
    return nncf.quantize(
        model,
        dataset,
        preset=nncf.QuantizationPreset.MIXED,
        subset_size=len(calibration),
    )
