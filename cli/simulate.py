"""frontier simulate (placeholder until built)."""

import click


@click.command(name="simulate")
def simulate():
    """Not built yet."""
