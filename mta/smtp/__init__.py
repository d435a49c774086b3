"""SMTP: intake (aiosmtpd server, policy, commit); delivery comes with issue 4."""
