"""sparse_frontier.tracer"""
