"""The PaliGemma core: torch only, nothing from the CLI."""
