"""deltamask: federated fine-tuning of vision foundation models by communicating mask deltas."""

__version__ = "0.1.0"
