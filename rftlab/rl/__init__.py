"""Reinforcement and supervised finetuning blocks for language models: sampling, log-probs, estimators."""
