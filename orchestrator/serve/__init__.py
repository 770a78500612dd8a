"""``orch serve``: the web dashboard, JSON API, server-sent events and Prometheus metrics.

Its own long-lived process (never code in a master's loop). Only the
``serve`` command imports this package; ``data`` is its one door to the
rest of orch. See docs/web.md.
"""
