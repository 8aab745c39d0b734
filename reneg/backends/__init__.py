"""Model backends: each turns a host's model into a :class:`reneg.backends.base.Backend`."""
