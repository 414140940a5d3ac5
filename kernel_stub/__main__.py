"""Entry point. kernel.json runs ``<python> -I -S <site-packages>/kernel_stub/__main__.py -f FILE``;
``python -m kernel_stub -f FILE`` works too.

Why ``-I -S`` and a path instead of ``-m``: ``site`` processes every ``.pth`` file of the base
environment at start-up (10-30 ms measured here, paid by every kernel start), and ``-m`` puts
the notebook's folder first on ``sys.path``, where a ``json.py`` beside the notebook would
shadow the standard library. The stub needs only the standard library and this distribution's
own directory, which we append to ``sys.path`` ourselves.
"""

import os
import sys

_distribution_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _distribution_dir not in sys.path:
    sys.path.append(_distribution_dir)

from kernel_stub.stub import main  # noqa: E402

main()
