"""What the inference process and the exporter share: option parsing."""
