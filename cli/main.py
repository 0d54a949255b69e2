"""The ``frontier`` command: one group, one sub-command module per capability."""

import click

from . import evaluate, policies, report, simulate, tasks, trace, verify


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sparse-frontier")
def cli():
    """Capture attention from real LLM runs, replay sparse-attention methods offline, verify on GPU.

    \b
    Example:
      frontier demo
    """


cli.add_command(trace.trace)
cli.add_command(tasks.tasks)
cli.add_command(simulate.simulate)
cli.add_command(policies.policies)
cli.add_command(verify.verify)
cli.add_command(report.report)
cli.add_command(report.demo)
cli.add_command(evaluate.evaluate)
