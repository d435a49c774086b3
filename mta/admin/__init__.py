"""Admin HTTP (health, readiness, metrics), the metrics themselves, and logging."""
