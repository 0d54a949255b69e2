"""sparse_frontier.simulator"""
