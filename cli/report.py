"""frontier report and demo (placeholder until built)."""

import click


@click.command()
def report():
    """Not built yet."""


@click.command()
def demo():
    """Not built yet."""
