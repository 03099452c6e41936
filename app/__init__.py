import engine  # noqa: F401  (first: it sets OpenMP's idle policy before anything loads torch)
