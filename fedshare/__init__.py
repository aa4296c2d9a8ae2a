"""FedShare: federated recommendation with personalised data sharing and unlearning.

The core library is Flower-free so that every piece can be unit-tested directly; the Flower
ServerApp strategies live in ``strategies/`` and the ClientApps in ``clients/``.
"""

from fedshare.errors import FedShareError

__all__ = ["FedShareError"]
__version__ = "0.1.0"
