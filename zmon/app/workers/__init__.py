"""`model.devices`: one worker process per device, supervised, their metrics merged into the parent's /metrics.

parent.py (the parent's Monitor and the merge of what workers send) → supervisor.py (start, watch, restart,
drain) → worker.py (the process body: a pipeline on one device) ; protocol.py (the messages between them).
"""
