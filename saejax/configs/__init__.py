"""Built-in config files; `--config NAME` finds them by file name."""
