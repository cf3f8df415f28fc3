"""The typer app; imports everything, imported by nothing."""
