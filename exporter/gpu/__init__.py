"""The exporter's view of the GPUs: a poller thread over a backend of ``vigil.gpu``."""
