"""The phi model family: presets (plain data), the network, and generation."""
