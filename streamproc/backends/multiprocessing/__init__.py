"""The multiprocessing backend (see :mod:`.run` for its data flow and shutdown)."""
