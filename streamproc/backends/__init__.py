"""Execution backends: ``simple`` (in-process) and ``multiprocessing``; nothing heavy is imported here."""
