"""The commands that read an output or a config without running one: status, estimate, export,
render, reparse."""
