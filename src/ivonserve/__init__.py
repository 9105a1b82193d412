"""ivonserve: test-time scaling with Bayesian (IVON) LoRA posteriors on vLLM."""

__version__ = "0.1.0"
