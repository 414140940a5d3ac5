"""uvkerneld: one uv-built virtual environment per Jupyter notebook, served by a per-host daemon.

Keep this file import-free: the kernel stub imports ``uvkerneld.protocol`` on every kernel start,
and everything imported here is paid for by every notebook.
"""

__version__ = "0.1.0"
