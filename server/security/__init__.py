"""Who is calling and what they may do: identities, roles, TLS, rate limits, the audit log."""
