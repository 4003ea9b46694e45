"""Attack tests: hostile input, password guessing, and a model-based search for a wrong answer."""
