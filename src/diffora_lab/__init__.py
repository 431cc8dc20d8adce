"""diffora_lab: DiffoRA (arXiv 2502.08905) and its baselines on Lightning, Hydra and peft."""

__version__ = "0.1.0"
