from paligemma_cli.cli import main

main()
