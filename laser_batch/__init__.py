"""laser-batch: train Laser (an LLM-based sequential recommender), export it to ONNX, score users in batch.

Importing the package is cheap: no torch, no model code. Components live in their own modules.
"""

__version__ = "0.1.0"
