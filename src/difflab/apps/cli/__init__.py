"""The `difflab` command (typer + rich): `app` holds the root command and `main`; one module per
command group beside it."""
