"""The build's stages, one module each, and the parts they share."""
