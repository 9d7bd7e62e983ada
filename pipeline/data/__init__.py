"""Dataset formats, the embedded shapes generator, transforms, samplers and DataModules."""
