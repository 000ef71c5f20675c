"""The `cdka` command line: thin commands over the library (see cdka_search.cli.app)."""
