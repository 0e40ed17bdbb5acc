"""The federated algorithm, pure torch/numpy: client training, server aggregation, seeding, robust rules."""
