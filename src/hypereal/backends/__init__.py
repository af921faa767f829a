"""Generation backends: one module per provider, each implementing the protocols in ``base``."""
