"""landmarks: large-scale landmark recognition and retrieval.

Importing the package is cheap (no torch, no FAISS): the heavy modules are imported by the stages
that need them (``landmarks.train``, ``landmarks.extract``, ``landmarks.index``, ...).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
