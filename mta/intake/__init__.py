"""Intake: the SMTP server side (protocol, policy, auth, admission, trace headers, listeners)."""
