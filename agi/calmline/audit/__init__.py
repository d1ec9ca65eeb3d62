"""The audit trail: every step recorded durably (trail, store) and read back (report)."""
