"""Triton python-backend model running one rtq variant through our runners (ORT or OpenVINO).

Copied as-is into `<derived repository>/<variant>/1/model.py` by serving/triton/pyrepo.py. The
config's parameters say where the project and its environment live, because Triton's stub runs
its own interpreter in isolated mode and ignores PYTHONPATH.
"""

import json
import sys


def _add_paths(params: dict) -> None:
    for key in ("rtq_site_packages", "rtq_project_root"):
        path = params.get(key, {}).get("string_value")
        if path and path not in sys.path:
            sys.path.insert(0, path)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = config.get("parameters", {})
        _add_paths(params)
        from pathlib import Path

        import numpy as np  # after the paths: numpy must be the environment's (< 2)
        import triton_python_backend_utils as pb_utils

        from serving.repository.layout import open_variant
        from serving.runtimes import open_runner

        if int(np.__version__.split(".")[0]) >= 2:
            raise pb_utils.TritonModelException(
                f"numpy {np.__version__} in the model environment: the python backend returns empty "
                "outputs with numpy 2; install numpy<2"
            )
        variant_dir = Path(params["rtq_variant_dir"]["string_value"])
        variant = open_variant(variant_dir.parent, variant_dir.name)
        threads = int(params.get("rtq_threads", {}).get("string_value", variant.manifest.get("threads", 2)))
        self.np = np
        self.pb = pb_utils
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.runner = open_runner(
            variant.manifest["backend"], variant.model_path, variant.manifest["precision"], threads
        )
        self.runner.infer(np.zeros((1, *config["input"][0]["dims"]), dtype=np.float32))

    def execute(self, requests):
        np, pb = self.np, self.pb
        arrays = [pb.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        sizes = [a.shape[0] for a in arrays]
        try:
            logits = self.runner.infer(np.concatenate(arrays) if len(arrays) > 1 else arrays[0])
        except Exception as exc:
            return [pb.InferenceResponse(error=pb.TritonError(f"inference failed: {exc}")) for _ in requests]
        responses, offset = [], 0
        for n in sizes:
            out = pb.Tensor(self.output_name, np.ascontiguousarray(logits[offset : offset + n]))
            responses.append(pb.InferenceResponse(output_tensors=[out]))
            offset += n
        return responses

    def finalize(self):
        self.runner.close()
