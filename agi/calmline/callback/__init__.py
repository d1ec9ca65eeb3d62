"""Callback mail: the durable outbox and the worker that mails what it holds."""
