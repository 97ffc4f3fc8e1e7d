"""Privacy mechanisms: differential privacy (``dp``) with its accountant."""
