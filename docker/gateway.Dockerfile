# syntax=docker/dockerfile:1
# The fedpersona image: gateway (`fedpersona serve`), trainer (`fedpersona trainer`: round
# controller + Flower SuperLink), the round schedule and the in-cluster model bootstrap.
# It holds no vLLM: the engine runs in its own image (vllm.Dockerfile).
#
#   docker build -f docker/gateway.Dockerfile -t fedpersona:0.1.0 .
#
# The Helm chart overrides CMD per workload; the entry point is always the `fedpersona` CLI.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY adapters ./adapters
COPY service ./service
COPY trainer ./trainer
# CPU torch is enough for the gateway and for CPU training; GPU trainers build with
# --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --extra-index-url "${TORCH_INDEX}" . \
 && cd / \
 && python -c "import fedpersona.cli, fedpersona.trainer_api" \
 && python -c "import fedpersona.trainer.flower.deployment as d; assert (d.APP_DIR / 'pyproject.toml').is_file(), \
      'the Flower App (trainer/flower/flwr_app) is missing from the installed package'"

FROM python:${PYTHON_VERSION}-slim
RUN groupadd --gid 10001 fedpersona \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/fedpersona \
      --shell /usr/sbin/nologin fedpersona
COPY --from=build /opt/venv /opt/venv
# The venv's bin on PATH also lets the SuperLink find flower-superexec.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FEDPERSONA_HOME=/data \
    FEDPERSONA_HOST=0.0.0.0 \
    FEDPERSONA_PORT=8080
USER 10001:10001
WORKDIR /home/fedpersona
EXPOSE 8080
ENTRYPOINT ["fedpersona"]
CMD ["serve", "--engine-url", "http://vllm:8000", "--home", "/data"]
