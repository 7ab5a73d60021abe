"""Data sets and tasks. Everything the default presets use is shipped or generated offline."""
