"""Console scripts: one module per job, each a few lines of flags over a library function.

``setup.py`` maps every ``topk-*`` command to a module's ``main``; ``scripts/*.py``
are shims that call the same ``main``.
"""
