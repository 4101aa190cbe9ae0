"""Logic of the command-line tools in ``tools/``, one module per tool; the scripts only parse
arguments."""
