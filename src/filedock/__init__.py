"""filedock: move very large files into jobs on a server, resumable, verified and durable."""

__version__ = "0.1.0"
