# One image for the backend API, the model workers and fine-tuning; docker-compose.yml picks the command.
#
#   docker build -t gpt4roi-labelstudio .
#   docker run --rm -p 9090:9090 -v "$PWD/data/backend:/data" gpt4roi-labelstudio           # API
#   docker run --rm --gpus all -v "$PWD/data/backend:/data" gpt4roi-labelstudio python -m backend worker
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODEL_DIR=/data/models \
    DATA_DIR=/data

WORKDIR /app

# The dependencies pyproject.toml declares before the code, so that editing the code does not reinstall
# torch. The torch wheel on PyPI is the CUDA build: it uses the GPU that the NVIDIA container toolkit passes
# in, and the CPU otherwise.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/dependencies.txt \
    && pip install -r /tmp/dependencies.txt

# Then the project itself (the packages `backend` and `model`, with the demo checkpoint), without its
# test tools; `python backend/finetune.py` and `gpt4roi-backend` both import the installed package.
COPY . .
RUN pip install --no-deps .

# Unprivileged user; /data holds the model registry (MODEL_DIR) and the backend's own files (DATA_DIR).
RUN useradd --create-home --uid 1000 app \
    && mkdir -p /data/models \
    && chown -R app:app /data
USER app
VOLUME ["/data"]

EXPOSE 9090
# No HEALTHCHECK here: the API, the workers and fine-tuning need different ones (docker-compose.yml).
CMD ["python", "-m", "backend", "serve-api"]
