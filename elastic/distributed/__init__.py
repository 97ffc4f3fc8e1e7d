"""torch.distributed on elastic's cluster backends: torchrun's rendezvous and a c10d
store on etcd v3, and elastic's own collective training (no restarts)."""
