"""frontier policies (placeholder until built)."""

import click


@click.group()
def policies():
    """Not built yet."""
