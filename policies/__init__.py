"""sparse_frontier.policies"""
