"""Capture: what turns a running pipeline and the sampler's history into the analysis core's inputs.

The profile session (`zmon profile`), the live diagnosis window, torch.profiler traces and memory
snapshots, environment probes (versions, devices, which NVML GPU is the CUDA device), the disk test.
"""
