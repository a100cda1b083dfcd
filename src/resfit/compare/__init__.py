"""Side-by-side comparison of models trained with one recipe: accuracy, TTA, latency, size and cost."""

from .command import CompareConfig, CompareResult, CompareRow, compare

__all__ = ["CompareConfig", "CompareResult", "CompareRow", "compare"]
