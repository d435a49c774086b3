"""mta-fleet: a mail transfer agent fleet with a Postgres-backed queue."""

__version__ = "0.1.0"
