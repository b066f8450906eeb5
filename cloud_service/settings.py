"""P2's configuration: one pydantic-settings class read from `STIP_CLOUD_*` variables.

The push token is a `SecretStr` and may come from a file (`STIP_CLOUD_PUSH_TOKEN_FILE`, for
Docker secrets). Settings are built by `load_settings`, never at import time; command-line
flags given to `stip-cloud serve` win over the environment.
"""

from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from stip_http.settings import ServiceSettings

ENV_PREFIX = "STIP_CLOUD_"
DEFAULT_PORT = 8002
MIB = 1 << 20
GIB = 1 << 30

DType = Literal["float32", "bfloat16", "float16"]
Engine = Literal["transformers", "vllm"]


class CloudSettings(ServiceSettings):
    """`stip-cloud serve`: P2, the cloud service."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    port: int = Field(DEFAULT_PORT, ge=1, le=65535)
    data_dir: Path = Field(Path("data/cloud"), description="pushed weights and their active.json")

    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto: cuda when available")
    dtype: DType = "float32"

    max_sessions: int = Field(256, ge=1, description="live sessions at once")
    session_idle_ttl_s: int = Field(600, gt=0, description="a session unused this long expires")
    session_memory_bytes: int = Field(4 * GIB, gt=0, description="bound on the KV caches of all sessions")
    max_body_bytes: int = Field(128 * MIB, gt=0, description="forward request bodies; 413 past it")
    max_push_bytes: int = Field(256 * GIB, gt=0, description="weight push bodies; 413 past it")
    max_batch: int = Field(64, ge=1, description="rows of one forward request")
    max_prompt_tokens: int = Field(8192, ge=1, description="token mode: ids of one generate request")
    max_new_tokens: int = Field(2048, ge=1, description="token mode: the largest max_tokens of a generate request")
    forward_threads: int = Field(
        2, ge=1, description="worker threads per deployment that parse large forward bodies; more wait their turn"
    )
    batch_max_rows: int = Field(
        32, ge=1, description="rows of one batched forward (requests of one deployment together)"
    )
    batch_max_tokens: int = Field(8192, ge=1, description="rows x padded positions of one batched forward")
    batch_wait_ms: float = Field(
        20.0,
        ge=0,
        description="how long a batch may wait for more requests: only while it has fewer than the last two "
        "batches' requesters, and never more than half the previous batch's run time",
    )
    max_json_bytes: int = Field(MIB, gt=0, description="every body other than forward and push (JSON); 413 past it")
    max_response_bytes: int = Field(
        256 * MIB, gt=0, description="outputs of one forward, computed from the request before it runs; 422 past it"
    )
    forward_bodies: int = Field(
        4,
        ge=1,
        description="forward bodies of the largest size per deployment held at once: a body budget of this x "
        "max_body_bytes, each body taking its Content-Length of it (chunked: max_body_bytes); more wait",
    )

    max_sessions_per_user: int = Field(16, ge=1, description="live sessions of one credential subject")
    session_memory_bytes_per_user: int = Field(512 * MIB, gt=0, description="KV cache bytes of one user's sessions")
    max_forwards_per_user: int = Field(8, ge=1, description="forward requests of one user in flight; 429 past it")

    max_connections: int = Field(512, ge=1, description="open connections and requests (uvicorn limit_concurrency)")

    # The engine that runs θ′ (cloud_service.engines). vllm: decoders of the Llama family run in a
    # vLLM OpenAI server of their own, one process per deployment version, launched from the
    # vLLM environment (`make vllm-env`); other families stay on the in-process transformers engine.
    engine: Engine = Field("transformers", description="transformers (in process) or vllm (a vLLM server per version)")
    vllm_python: Path = Field(
        Path(".venv-vllm/bin/python"), description="the Python of the vLLM environment (`make vllm-env` builds it)"
    )
    vllm_tensor_parallel_size: int = Field(1, ge=1, description="vLLM --tensor-parallel-size (GPUs per replica)")
    vllm_pipeline_parallel_size: int = Field(1, ge=1, description="vLLM --pipeline-parallel-size (stages, nodes)")
    vllm_gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vLLM --gpu-memory-utilization")
    vllm_kv_cache_gib: int = Field(1, ge=1, description="CPU builds: VLLM_CPU_KVCACHE_SPACE (GiB of KV cache)")
    vllm_cpu_threads_bind: str = Field(
        "auto", description="CPU builds: VLLM_CPU_OMP_THREADS_BIND (auto, nobind or core ids such as 0-15)"
    )
    vllm_cpu_reserved: int = Field(0, ge=0, description="CPU builds: VLLM_CPU_NUM_OF_RESERVED_CPU")
    vllm_extra_args: str = Field(
        "", description="more vLLM server flags, shell-quoted (e.g. --distributed-executor-backend ray)"
    )
    vllm_start_timeout_s: float = Field(600.0, gt=0, description="how long a vLLM server may take to answer /health")


def load_settings(**overrides: Any) -> CloudSettings:
    """Settings from the environment; explicit keyword arguments (CLI flags) win."""
    return CloudSettings(**{k: v for k, v in overrides.items() if v is not None})
