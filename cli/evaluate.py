"""frontier evaluate (placeholder until built)."""

import click


@click.command(name="eval")
def evaluate():
    """Not built yet."""
