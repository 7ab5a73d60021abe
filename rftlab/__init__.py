"""rftlab: a lab for two gradient pathologies of language-model finetuning.

- Vanishing gradients in reinforcement finetuning (Razin et al., ICLR 2024).
- Gradient entanglement in margin-based preference losses (Yuan et al., 2024).

Heavy libraries (torch, pandas, matplotlib) are imported inside functions so that
``rftlab --help`` and ``rftlab list`` start fast.
"""

__version__ = "0.1.0"
