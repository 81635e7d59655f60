"""The composition root: every mode assembles the same parts (zmon.app.parts) around a Monitor.

- watch.py   `zmon watch`: NVML + host sources, /metrics (never imports torch)
- run.py     `zmon run`: the monitor, the loaded and instrumented pipeline, the workload runner
- attach.py  `zmon.attach(pipe)`: the same in-process parts around a host's pipeline
- profile.py `zmon profile`: a Monitor without HTTP at the profile's rate, then the analysis and reports
"""
