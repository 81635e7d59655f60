"""The analysis core, pure: facts from generation records and samples, statistics, the diagnosis flowchart
and findings, and the reports (JSON, Markdown, HTML) and comparisons rendered from them.

It imports no torch, NVML, psutil, HTTP or threading (an import-linter contract in pyproject.toml checks it):
what it judges is handed to it as plain values by zmon.capture.
"""
