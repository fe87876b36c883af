"""The Ray backend (optional extra ``streamproc[ray]``): CPU and GPU workers as Ray actors.

Nothing here imports Ray: :mod:`.cluster` does, when a run starts (an ImportError names
``pip install 'streamproc[ray]'``). See :mod:`.run` for the data flow and NOTE [ streamproc
ray shutdown ].
"""

from .actor_pool import release_warm_actors

__all__ = ["release_warm_actors"]
