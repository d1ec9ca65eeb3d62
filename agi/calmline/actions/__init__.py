"""The keypad actions: each talks to a `Channel` through the FastAGI layer's contract."""
