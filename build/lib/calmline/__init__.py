"""calmline: keypad codes that let contact-centre agents warn, transfer or end an abusive call."""

__version__ = "0.1.0"
