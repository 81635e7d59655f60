"""Alerting: zmon's alerts delivered to Alertmanager (v2 API) without blocking sampling or generation."""

from zmon.alerting.alertmanager import AlertmanagerClient, DeliveryStats

__all__ = ["AlertmanagerClient", "DeliveryStats"]
