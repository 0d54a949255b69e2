"""frontier verify (placeholder until built)."""

import click


@click.command(name="verify")
def verify():
    """Not built yet."""
