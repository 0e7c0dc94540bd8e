"""One module per subcommand; each is registered through the `paligemma.commands` entry-point group."""
