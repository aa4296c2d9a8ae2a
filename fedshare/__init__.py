"""FedShare: federated recommendation with personalised data sharing and unlearning.

The core knows nothing of how it is run: the Flower ServerApp lives in ``strategies/``, the
ClientApp in ``clients/``, the ``fedshare`` command and every launcher in ``simulations/``. Flower
enters the core in one module, :mod:`fedshare.protocol`, the wire format both apps share.
"""

from fedshare.errors import FedShareError

__all__ = ["FedShareError"]
__version__ = "0.1.0"
