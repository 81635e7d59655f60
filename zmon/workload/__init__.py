"""The workload behind `zmon run`: pipeline loading (incl. the embedded tiny Z-Image) and generation."""
