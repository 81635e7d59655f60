"""Providers: the only modules that import pynvml, psutil or torch.cuda. Each returns immutable samples."""

from zmon.providers.base import Provider, SourceUnavailable

__all__ = ["Provider", "SourceUnavailable"]
