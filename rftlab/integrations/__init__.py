"""Bridges from rftlab's diagnostics to other training libraries.

- :mod:`rftlab.integrations.trl`: ``transformers`` TrainerCallbacks for TRL's ``DPOTrainer`` (per-pair gradient
  entanglement, Yuan et al. 2024) and ``GRPOTrainer`` (per-prompt reward std, the sampled face of Razin et al.
  2024's vanishing gradients). Needs ``pip install 'rftlab[trl]'``.

Nothing is imported here, so ``import rftlab.integrations`` stays cheap and never pulls in an optional library.
"""
