"""elastic: a federated / elastic training daemon.

A coordinator owns a PyTorch model per job; workers join and leave at any time,
pull the model, train on their own data, and push updates back over ZeroMQ.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
