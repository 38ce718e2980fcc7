"""What every command line shares: `-h` answers as `--help` does."""

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}
# For the commands whose help shows each option's default.
CONTEXT_SETTINGS_WITH_DEFAULTS = {**CONTEXT_SETTINGS, "show_default": True}
