"""The ``sentinel`` command line: one module per subcommand."""
