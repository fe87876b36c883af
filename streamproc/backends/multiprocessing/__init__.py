"""The multiprocessing backend: CPU and GPU worker processes on one machine.

Importing this package starts nothing and imports nothing heavy (no torch): the main process,
every worker and ``streamproc/__init__.py`` import from it. See ``executor.py`` for the data flow.
"""
