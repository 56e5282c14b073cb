"""The `corral` command line: the typer app (main) and its command groups, one module each."""
