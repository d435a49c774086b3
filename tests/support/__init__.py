"""Test helpers: nodes in the test's loop, SMTP clients, waits with deadlines."""
