"""sparse_frontier.kernels"""
