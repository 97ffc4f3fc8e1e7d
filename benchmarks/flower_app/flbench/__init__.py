"""FedAvg on a random model, for benchmarks/vs_flower.py."""
