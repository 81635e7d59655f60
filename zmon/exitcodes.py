"""The process exit codes of every zmon command, in one place (only zmon.cli exits the process)."""

from __future__ import annotations

from typing import Final

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1  # the command ran and failed (cannot load the model, cannot bind, broken setup)
EXIT_USAGE: Final = 2  # invalid arguments, configuration or workload: nothing was started
