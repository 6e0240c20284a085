"""``python -m daad_ext``: versions, build, backends and CPU features, for bug reports."""
from .info import report

print(report())
