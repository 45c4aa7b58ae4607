"""The dispatched functional ops (the ``mx.fast`` of mlx-primitives).

Each call is routed to the variant tuned for this chip and problem (``mlxp-tune``), or to the
op's safe default where nothing is tuned.
"""

# The same names as ``mlx_primitives.ops``: one list, kept there.
from ..ops import *  # noqa: F403
from ..ops import __all__  # noqa: F401
