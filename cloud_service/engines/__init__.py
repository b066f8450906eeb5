"""The engines that run θ′ for P2 (`STIP_CLOUD_ENGINE`, PROTOCOL.md section 7).

P2 keeps the front door (credentials, key versions, validation, sessions, limits, metrics); an
engine runs θ′. Both engines give the service the same small surface, the one of
`shared.runtime.CloudModel`: `family`, `config`, `dims`, `device`, `dtype` and
`forward(inputs_embeds, attention_mask, cache, last_only=...) -> CloudOutput`.

- `transformers` (the default): the stock class in P2's own process (`shared.runtime`), every
  family, every output, KV caches held by P2's session store.
- `vllm`: a vLLM OpenAI server per deployment version, in its own process and environment
  (`cloud_service.engines.vllm`). Serves the families in `VLLM_FAMILIES`; a deployment of any
  other family (GPT-2, BERT, the paper's model, ViT, MoE) stays on the transformers engine.
"""

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from cloud_service.engines.vllm import VLLM_FAMILIES, VllmModel, start_vllm_model, validate_checkpoint
from cloud_service.schemas import PushManifest
from cloud_service.settings import CloudSettings
from shared.runtime import CloudModel, load_cloud_model

log = logging.getLogger("stip.cloud.engines")


def load_model(
    settings: CloudSettings,
    manifest: PushManifest,
    path: Path,
    device: torch.device,
    *,
    work_dir: Path,
    on_progress: Callable[[int, int], None] | None = None,
) -> CloudModel | VllmModel:
    """θ′ at `path` on the engine the settings choose for its family (blocking).

    `on_progress(done, total)` counts the tensor bytes the in-process engine has loaded; a vLLM
    server loads θ′ itself and reports nothing until it serves."""
    if settings.engine == "vllm" and manifest.family in VLLM_FAMILIES:
        return start_vllm_model(settings, manifest, path, device=device, work_dir=work_dir)
    if settings.engine == "vllm":
        log.info(
            "deployment %s: the vllm engine serves the %s families only; this %s model runs on the transformers engine",
            manifest.deployment_id,
            "/".join(sorted(VLLM_FAMILIES)),
            manifest.family,
        )
    return load_cloud_model(
        manifest.config, [path], family=manifest.family, device=device, dtype=settings.dtype, on_progress=on_progress
    )


def close_model(model: object) -> None:
    """Stop what an engine runs for a model it no longer serves, once the requests in flight on it
    have finished (a vLLM server; nothing in process: requests keep their reference to the model)."""
    if isinstance(model, VllmModel):
        model.close()


def close_models(models: list[object]) -> None:
    """`close_model` for each, at once (shutdown: the servers drain and stop side by side)."""
    threads = [threading.Thread(target=close_model, args=(m,), name="stip-engine-close") for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


__all__ = ["VLLM_FAMILIES", "VllmModel", "close_model", "close_models", "load_model", "validate_checkpoint"]
