# syntax=docker/dockerfile:1
# llmray image for the Ray head and workers on KubeRay (ray-cluster.yaml, cluster/*.yaml).
#
# Build:  docker build -t <registry>/llmray:0.1.0 .
# The base image carries Ray 2.60.0 on Python 3.12 with CUDA; it runs as the non-root user `ray`
# (uid 1000, gid 100 "users") whose conda env under /home/ray/anaconda3 receives the packages below.
# Every pin below satisfies the matching range in pyproject.toml (tests/cluster/test_dockerfile.py checks
# it); torch/triton match the GPU machine llmray is benchmarked on. No credentials are baked in: S3
# access comes from the pod's service account or environment at run time.
FROM rayproject/ray:2.60.0-py312-gpu

LABEL org.opencontainers.image.title="llmray" \
      org.opencontainers.image.description="Qwen3 LLMs from pretraining to serving on Ray" \
      org.opencontainers.image.licenses="Apache-2.0"

# 1000:100 is the base image's own non-root user `ray` in group `users` (numeric so that
# Kubernetes' runAsNonRoot can verify it without reading /etc/passwd).
USER 1000:100
# Created by `ray`, not by WORKDIR (which may create it as root): `pip install .` builds in this tree.
RUN mkdir -p /home/ray/llmray
WORKDIR /home/ray/llmray

# Dependencies first (their own layer, rebuilt only when the pins change), then the code.
RUN pip install --no-cache-dir \
        "torch==2.11.0" \
        "triton==3.6.0" \
        "ray[serve,train,data]==2.60.0" \
        "fastapi==0.165.0" \
        "uvicorn==0.54.0" \
        "pydantic==2.14.4" \
        "prometheus-client==0.26.0" \
        "peft==0.21.2" \
        "bitsandbytes==0.50.2" \
        "transformers==5.24.0" \
        "tokenizers==0.23.3" \
        "safetensors==0.8.0" \
        "jinja2==3.1.6" \
        "pyyaml==6.0.4" \
        "tqdm==4.70.1" \
        "matplotlib==3.11.2" \
        "numpy==2.4.6" \
        "openai==3.57.0" \
        "llguidance==1.9.1" \
        "xgrammar==0.2.9" \
        "apache-tvm-ffi==0.1.15.post2"

COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 llmray ./llmray
COPY --chown=1000:100 jobs ./jobs
# --no-deps: the pinned set above is the whole dependency closure we ship; pip must not re-resolve it.
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import llmray, ray; assert ray.__version__ == '2.60.0', ray.__version__"

ENV PYTHONUNBUFFERED=1
# Ray's Serve HTTP proxy, dashboard, client server, GCS and metrics export ports (see ray-cluster.yaml).
EXPOSE 8000 8265 10001 6379 8080
