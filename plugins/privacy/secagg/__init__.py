"""Secure aggregation (SecAgg+, Bell et al. 2020; Bonawitz et al. 2017): the
coordinator learns the sum of the clients' updates and nothing else."""
