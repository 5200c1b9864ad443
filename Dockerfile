# ctc-serve: OpenAI-compatible server with CTC-drafter speculative decoding.
# CUDA-enabled torch comes from the base image; the server falls back to CPU where no GPU is given.
#   docker build -t ctc-serve .
#   docker run --gpus all -p 8000:8000 ctc-serve            # serves the embedded demo model
#   docker run -p 8000:8000 ctc-serve --device cpu --api-key secret
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    CTC_HOST=0.0.0.0 \
    CTC_PORT=8000 \
    CTC_MODEL=/app/models/demo-llama

WORKDIR /app

# Dependencies first (cached across source edits); torch is already in the base image.
COPY pyproject.toml README.md ./
COPY server/ server/
COPY drafter/ drafter/
COPY kernels/ kernels/
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 1000 --user-group ctc

# Model weights last: they change independently of the code. models/demo-llama-ctc, when it has
# been trained, is picked up as the default drafter (sibling <model>-ctc directory).
COPY --chown=1000:1000 models/ /app/models/

USER 1000:1000
EXPOSE 8000

# Loading can take a while on first start: give it a start period before failures count.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('CTC_PORT', '8000')}/health\", timeout=4)"]

ENTRYPOINT ["ctc-serve"]
