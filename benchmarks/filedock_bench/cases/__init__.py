"""The five benchmark cases; each ``run(options)`` returns its figures."""
