"""Object storage for generated media and content-type sniffing."""
