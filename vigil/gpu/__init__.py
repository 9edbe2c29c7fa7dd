"""The hardware seam: a GPU backend (NVML through nvidia-ml-py, or a fake fleet for machines
without a GPU) answering in base units. The exporter's poller and the doctor read GPUs only
through it."""
