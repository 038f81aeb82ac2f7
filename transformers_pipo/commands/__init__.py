"""Subcommands of the `pipo` CLI (see `transformers_pipo.cli`)."""
