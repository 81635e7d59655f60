"""Fault injection against a real zmon daemon (HTTP floods, idle connections, slow clients, bad input)."""
