"""Development tools of the repository: the generators of every generated file. Not installed
with the package; run them from a checkout (``scripts/generate``)."""
