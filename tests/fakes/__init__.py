"""Fakes: NVML and CUDA (which cannot exist on a CI machine), and a deterministic psutil for golden files.

Real psutil, real Prometheus/Alertmanager and the real tiny pipeline are used everywhere else.
"""
