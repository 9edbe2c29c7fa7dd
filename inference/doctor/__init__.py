"""The environment doctor: finds why serving will not start, or will hang, before it does.

``python -m inference doctor`` runs every check (``checks.CHECKS``) and prints its verdict; the
server runs the checks that can stop it (``startup``) before it loads the model.
"""
