"""GPUs behind a narrow seam: a backend (NVML, or a fake fleet) read by a poller thread."""
