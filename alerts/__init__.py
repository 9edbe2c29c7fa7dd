"""Prometheus alert rules (generated into alerts/*.rules.yml), runbooks, and Alertmanager's
configuration."""
