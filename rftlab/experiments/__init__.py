"""One module per experiment; each registers itself with :func:`rftlab.registry.experiment`."""
