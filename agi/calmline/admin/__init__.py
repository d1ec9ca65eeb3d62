"""Admin tools: the rendered dialplan, the shipped prompts and `calmline check`."""
