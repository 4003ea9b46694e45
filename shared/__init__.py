"""authmesh shared library: verification, key cache, denylist, events, NATS and Redis wiring."""
