"""`rtq eval`: a repository variant on any labelled folder, beside its FP32 PyTorch model."""

from __future__ import annotations

from pathlib import Path

from serving.bench.accuracy import predict_top5, reference_top5, score
from serving.data.datasets import open_labelled
from serving.data.loader import load_uint8
from serving.errors import RtqError
from serving.models.zoo import LoadedModel, class_wnids, create_model
from serving.repository.layout import open_variant
from serving.runtimes import open_runner
from serving.settings import PROJECT_ROOT


def fp32_model_of(manifest: dict) -> LoadedModel:
    """The exact FP32 model a variant was built from, checked by the weights' sha256."""
    weights = manifest.get("weights")
    path = weights if weights and Path(weights).is_file() else None
    loaded = create_model(manifest["model"], weights=path)
    if manifest.get("weights_sha256") != loaded.weights_sha256:
        raise RtqError(
            f"variant {manifest['variant']} was built from weights {weights} "
            f"(sha256 {manifest.get('weights_sha256')}), which are not available here; rebuild it"
        )
    return loaded


def evaluate_variant(
    repository: Path,
    name: str,
    data: str,
    data_root: Path | None = None,
    limit: int | None = None,
    threads: int = 2,
    progress: bool = True,
) -> dict:
    variant = open_variant(repository, name)
    m = variant.manifest
    pp = variant.preprocessing
    images, labels = open_labelled(data, data_root).for_classes(class_wnids(m["classes"]))
    images = images.head(limit)
    labels = labels[: len(images)]
    uint8 = load_uint8(images, pp, progress)
    loaded = fp32_model_of(m)
    ref5 = reference_top5(
        loaded,
        uint8,
        [it.path.name for it in images.items],
        PROJECT_ROOT / ".cache" / "reference",
        progress,
    )
    with open_runner(m["backend"], variant.model_path, m["precision"], threads) as runner:
        pred5 = predict_top5(runner.infer, uint8, pp, desc=name, progress=progress)
        runtime = runner.describe()
    acc = score(images.name, pred5, ref5, labels)
    return {
        "variant": name,
        "model": m["model"],
        "trained": m.get("trained", True),
        "precision": m["precision"],
        "backend": m["backend"],
        "runtime": runtime,
        "data": str(images.root),
        **acc.to_dict(),
    }
