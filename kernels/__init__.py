"""sparse_frontier.kernels: Triton kernels that execute Selections, their torch references, FlexAttention peers."""

from .run import KernelRun, Prepared, launch, prepare, run_selection

__all__ = ["KernelRun", "Prepared", "launch", "prepare", "run_selection"]
