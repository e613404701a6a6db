"""Model runtimes. Backends know nothing of the scheduler or the frontend."""
