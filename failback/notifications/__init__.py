"""Notifications: people and systems told when a failback needs them, by e-mail and signed webhooks.

``events.py`` is the one place that says which audit rows and which waiting moments are worth telling;
``routing.py`` who is told (administrators' endpoints, users' own e-mail subscriptions); ``delivery.py``
sends one message, records the attempt and schedules the next with backoff; ``config.py`` the audited
changes to endpoints and subscriptions. Nothing here can block or fail a failback step: work is queued
after the step's transaction commits, and a delivery's failure is only recorded.
"""
