"""Fakes for what cannot exist on a CI machine: NVML, CUDA. Everything else in the tests is real."""
