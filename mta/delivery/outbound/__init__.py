"""The outbound SMTP client: aiosmtplib for session setup, then a pipelining wire."""
