"""aphro's command line: click commands only; the work is done by engine functions."""
