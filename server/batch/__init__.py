"""Offline batch scoring (``peregrine batch``): a file of rows scored through the server's own
data plane (repository, backends, preprocessing, batching; no transport) into a database.

``table`` reads the input file, ``sink`` owns the output database (predictions, runs, done
chunks), ``runner`` scores one file chunk by chunk, ``cron`` and ``watch`` the schedule mode.
The composition root (``server.app.open_offline``) hands the runner its data plane: nothing
here imports a backend, the repository or the scheduler.
"""
