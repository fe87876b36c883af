"""What every backend shares: running a task, handing out tasks, reordering their outputs,
the dispatch schedule, and serializing the plan for other processes.

Nothing here starts a process or a thread: backends own those (see
:mod:`streamproc.backends`). Each module is importable from a worker process at no cost.
"""
