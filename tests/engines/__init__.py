"""Real engines (PostgreSQL, ...) started privately for tests and benchmarks, one module each."""
