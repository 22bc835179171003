"""The server: biopetals-node serving a range of transformer blocks."""
