"""millstream application layer: settings, the faust App factory, the CLI."""
