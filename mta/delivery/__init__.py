"""Delivery: the SMTP client side (claim loop, attempts, settlement, recovery, routing,
shaping, retries, DSNs, and the outbound client in :mod:`mta.delivery.outbound`)."""
