"""sparse_frontier.cli"""
