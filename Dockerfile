# One image for the three parties; docker-compose.yml picks the command of each.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

WORKDIR /app
# torch first and pinned; on Linux this wheel runs on CUDA when a GPU is reserved, else on the CPU.
RUN pip install torch==2.13.0
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY stip_http ./stip_http
COPY stip_demo ./stip_demo
COPY developer_service ./developer_service
COPY cloud_service ./cloud_service
COPY user_client ./user_client
RUN pip install '.[demo]'  # the compose file's demo service runs `stip demo`

RUN useradd --create-home --uid 1000 stip && mkdir -p /data /models && chown stip:stip /data /models
USER stip
VOLUME ["/data"]
