# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target train -t trainer .   GPU training job: python -m job
#   docker build --target edge  -t edge .      ONNX edge predictor: python -m edge.predict (no TensorFlow)
#
# Base image choice: python:3.11-slim (Debian bookworm), exact patch tag, plus the CUDA libraries
# as pinned pip wheels (requirements-gpu.txt, what `tensorflow[and-cuda]==2.21.0` installs). Not
# nvidia/cuda: its Ubuntu 22.04 images ship Python 3.10 and the lock needs 3.11; not
# tensorflow/tensorflow:*-gpu: it brings its own TensorFlow and Python packages that would then be
# reinstalled over. This way the image's Python packages are exactly requirements.txt, the same
# lock the tests and CI install (tests/test_docker_recipe.py replays this stage's pip command),
# and the GPU driver is the only thing taken from the node.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS python-base
# No .pyc litter, logs straight to the pod's stdout, pip quiet and cache-free in the image.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A fixed, non-root user; its uid is what runAsUser in infra/ refers to.
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid app --create-home --home-dir /home/app --shell /usr/sbin/nologin app
WORKDIR /app

# ---- GPU training image -------------------------------------------------------------------
FROM python-base AS train
COPY requirements.txt requirements-gpu.txt /tmp/requirements/
RUN python -m pip install --no-cache-dir pip==25.3 \
    && python -m pip install --no-cache-dir -r /tmp/requirements/requirements.txt
RUN python -m pip install --no-cache-dir --no-deps -r /tmp/requirements/requirements-gpu.txt
# export/ too: with EXPORT_ONNX=1 the training job converts its model to ONNX at its end.
COPY job/ /app/job/
COPY storage/ /app/storage/
COPY common/ /app/common/
COPY edge/ /app/edge/
COPY export/ /app/export/
# Everything the job writes goes under /tmp (an emptyDir in Kubernetes; the root file system is
# read-only there): pulled data, backbone weights (Keras), matplotlib's cache, local outputs.
# Keras' and matplotlib's folders stay outside CACHE_DIR, which the job marks and prunes as its own.
ENV CACHE_DIR=/tmp/image-classifier-cache \
    KERAS_HOME=/tmp/keras \
    MPLCONFIGDIR=/tmp/matplotlib \
    OUTPUT_URI=/tmp/outputs
USER 10001:10001
ENTRYPOINT ["python", "-m", "job"]

# ---- Edge predictor image -------------------------------------------------------------------
FROM python-base AS edge
COPY requirements-edge.txt /tmp/requirements/
RUN python -m pip install --no-cache-dir pip==25.3 \
    && python -m pip install --no-cache-dir -r /tmp/requirements/requirements-edge.txt
# Only the edge package: the predictor, its image decoding and runtime; nothing imports TensorFlow.
COPY edge/ /app/edge/
USER 10001:10001
ENTRYPOINT ["python", "-m", "edge.predict"]
