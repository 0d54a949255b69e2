"""frontier tasks (placeholder until built)."""

import click


@click.group()
def tasks():
    """Not built yet."""
