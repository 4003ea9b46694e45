"""Benchmarks behind ``authmesh bench``: each module measures one thing and reports against its goals."""
