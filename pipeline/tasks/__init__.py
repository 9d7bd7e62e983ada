"""LightningModules: compose a net with its loss, metrics and logging; the only place that knows Lightning."""
