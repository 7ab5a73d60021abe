"""Benchmarks of rftlab's training and sampling loops against TRL and minimal PyTorch loops.

``python -m benchmarks`` (or ``rftlab bench``) runs them all; :mod:`benchmarks.runner` describes the output.
"""
