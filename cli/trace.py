"""frontier trace (placeholder until built)."""

import click


@click.group()
def trace():
    """Not built yet."""
