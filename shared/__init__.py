"""The library behind :mod:`authmesh`'s public API (private: import from ``authmesh``)."""
