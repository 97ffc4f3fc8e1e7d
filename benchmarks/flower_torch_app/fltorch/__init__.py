"""FedAvg on elastic's models and data, for benchmarks/vs_flower_models.py."""
