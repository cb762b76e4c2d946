# The CUDA path: the PyTorch twin (dh_mlx.torch) on an NVIDIA GPU, and the dh-mlx CLI (MLX on the CPU).
#
#   docker build -t dh-mlx-cuda .
#   docker run --rm --gpus all dh-mlx-cuda python benchmarks/cuda_twin.py
#   docker run --rm --gpus all -v "$PWD/model:/model" dh-mlx-cuda \
#       python -c "import dh_mlx.torch as t, torch; m = t.load_model('/model'); print(m(torch.tensor([[1, 2, 3]], device='cuda')).shape)"
#
# The torch wheel from PyPI brings its own CUDA libraries (CUDA 13 for torch 2.13), so the base image only
# has to suit the host driver; pick another tag with --build-arg CUDA_IMAGE=... for an older driver.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# libopenblas: MLX's CPU backend is much faster with it (dh_mlx/backend/cpu/blas.py loads it before MLX)
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv libopenblas0-pthread \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

# torch alone first: the largest layer, and the one that changes least
ARG TORCH_VERSION=2.13.0
RUN pip install "torch==${TORCH_VERSION}"

WORKDIR /app
COPY . /app
# A plain (non-editable) install: the wheel carries the presets, the sample tokenizer and corpus. Installing
# without the `torch` extra keeps the torch above.
RUN pip install ".[cpu]" \
    && cd / && python -c "import dh_mlx.torch, dh_mlx.cli; print('dh_mlx.torch imports')" \
    && dh-mlx info --params tiny > /dev/null

CMD ["dh-mlx", "--help"]
