"""`python -m zmon` = the `zmon` command."""

from zmon.cli import run

run()
